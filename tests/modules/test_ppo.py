"""PPOModule on a tiny LLaMA: rollout masks, ratio == 1 before any update, reference without a copy,
checkpoints and exports, and learning with a rule-based reward."""


import lightning as L
import pytest
import torch

from alpaca_rlhf.data import PromptDataModule
from alpaca_rlhf.models import LoraSpec, ModelSpec
from alpaca_rlhf.modules import PPOModule
from alpaca_rlhf.modules.policy import ValueHead
from alpaca_rlhf.modules.ppo import GenerationHParams, PPOHParams
from alpaca_rlhf.modules.scorers import TokenIdScorer
from alpaca_rlhf.ppo import FixedKLController

SAMPLE = "alpaca_rlhf/data/samples/alpaca_sample.json"
LORA = LoraSpec(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def make_module(base, tmp_path, scorer=None, lr=1e-3, lora=LORA, value_head=ValueHead, ref_model=None, **ppo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    targets = [tok.convert_tokens_to_ids(t) for t in [".", ",", "Ġa", "Ġand", "Ġthe", "Ġin"]]
    return PPOModule(policy=ModelSpec(name_or_path=str(base)), scorer=scorer or TokenIdScorer(targets), lora=lora,
                     value_head=value_head, ref_model=ref_model,
                     ppo=PPOHParams(**{"ppo_epochs": 2, "mini_batch_size": 4, **ppo}),
                     generation=GenerationHParams(max_new_tokens=12), kl_controller=FixedKLController(0.01),
                     optimizer=lambda p: torch.optim.AdamW(p, lr=lr, eps=1e-5), save_freq=2,
                     output_dir=str(tmp_path / "ppo_out"), log_samples_every=0)


def make_data(batch_size=8):
    return PromptDataModule(SAMPLE, val_set_size=8, batch_size=batch_size, max_prompt_length=96, seed=1)


def trainer(iterations, **kw):
    return L.Trainer(max_epochs=1, limit_train_batches=iterations, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, **kw)


def first_batch(module, dm):
    dm.connect(module.tokenizer)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_rollout_masks_rewards_and_zero_kl_at_start(tiny_sft_run, tmp_path):
    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path)
    batch = first_batch(module, make_data())
    rollout, _ = module.make_rollout(batch)
    B, C = batch["input_ids"].shape
    T = rollout.response_mask.shape[1]
    assert rollout.query_responses.shape == (B, C + T) and rollout.logprobs.shape == (B, T)
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    responses = rollout.query_responses[:, C:]
    for row, mask in zip(responses, rollout.response_mask, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # valid tokens first, then nothing
        eos_at = (row == eos).nonzero()
        if len(eos_at):
            assert int(eos_at[0]) == n - 1  # the first EOS is the last valid token
        assert (row[n:] == pad).all()
    # B = 0 in a fresh LoRA: the policy is its reference, so the KL is exactly zero
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs) and (rollout.kl == 0).all()
    # the score sits on the last valid token; everything else in the reward is -beta * kl = 0
    last = rollout.response_mask.sum(1) - 1
    assert torch.equal(rollout.rewards[torch.arange(B), last], rollout.scores)
    assert (rollout.rewards.sum(1) == rollout.scores).all()
    assert (rollout.values[~rollout.response_mask] == 0).all() and (rollout.values == 0).all()  # zero-init head
    assert (rollout.advantages[rollout.response_mask].abs() > 0).any()


def test_ratio_is_exactly_one_on_the_first_minibatch(tiny_sft_run, tmp_path):
    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path)
    assert all(m.p == 0 for m in module.modules() if isinstance(m, torch.nn.Dropout))  # LoRA dropout 0.1 -> 0
    trainer(1).fit(module, make_data())
    assert abs(module.last_stats["ppo/ratio_first_minibatch"] - 1.0) < 1e-6
    assert module.iteration == 1 and (tmp_path / "ppo_out/step_1/adapter_model.safetensors").is_file()


def test_policy_forward_is_the_full_forward_at_response_positions(tiny_sft_run, tmp_path):
    """Logits only for the T response positions (logits_to_keep) and values from a hook: same numbers as
    slicing a full forward with every layer's hidden states."""
    from alpaca_rlhf.ppo import response_logits_slice
    from alpaca_rlhf.ppo.rollout import position_ids_from_mask

    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path)
    torch.nn.init.normal_(module.policy.value_head.summary.weight, std=0.5)
    batch = first_batch(module, make_data())
    rollout, _ = module.make_rollout(batch)
    qr, am, C = rollout.query_responses, rollout.attention_mask, rollout.context_length
    T = qr.shape[1] - C
    with torch.no_grad():
        logits, values = module.policy(qr, am, C)
        full = module.policy.lm(input_ids=qr, attention_mask=am, position_ids=position_ids_from_mask(am),
                                output_hidden_states=True)
        expected_values = module.policy.value_head(full.hidden_states[-1])[:, C - 1 : -1]
    assert logits.shape == (qr.shape[0], T, full.logits.shape[-1]) and values.shape == (qr.shape[0], T)
    torch.testing.assert_close(logits, response_logits_slice(full.logits, C), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
    assert values.abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_reusing_the_rollout_forward_gives_the_same_update(tiny_sft_run, tmp_path, checkpointing):
    """One micro-batch = the whole batch: the first step takes the rollout's own forward (with autograd)
    instead of a second one. Ratio exactly 1, and the same adapter as with the second forward."""
    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    states = {}
    for reuse in (True, False):
        L.seed_everything(0)
        module = make_module(base, tmp_path / str(reuse), mini_batch_size=None, reuse_rollout_forward=reuse)
        module.policy.lm.get_base_model().config.use_cache = True
        if checkpointing:
            module.policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        hook = module.policy.register_forward_hook(lambda m, a, o, calls=calls: calls.append(torch.is_grad_enabled()))
        trainer(1).fit(module, make_data())
        hook.remove()
        assert module.last_stats["ppo/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
        # the rollout's policy forward, then 2 epochs x 1 step: the first step reuses the rollout's forward
        assert calls == ([True, True] if reuse else [False, True, True])
        states[reuse] = {k: v.clone() for k, v in module.policy.state_dict().items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in states[True].values())  # it did update
    for k, v in states[True].items():
        torch.testing.assert_close(v, states[False][k], rtol=1e-4, atol=1e-6)


def test_reference_is_the_policy_without_its_adapter(tiny_sft_run, tmp_path):
    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    module = make_module(base, tmp_path)
    from transformers import AutoModelForCausalLM

    n_base = AutoModelForCausalLM.from_pretrained(base).num_parameters()
    frozen = sum(p.numel() for p in module.policy.parameters() if not p.requires_grad)
    assert frozen == n_base and module.ref_model is None  # one copy of the base weights, no more
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "value_head" in n for n in trainable)


def test_separate_critic_warm_started_from_a_reward_model_trains_its_own_trunk(tiny_sft_run, tmp_path):
    from functools import partial

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from alpaca_rlhf.models import load_sequence_classifier
    from alpaca_rlhf.modules.policy import SeparateCritic

    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    # an RM-shaped folder: the merged SFT model as a one-score sequence classifier with a random head
    rm = load_sequence_classifier(ModelSpec(name_or_path=str(base)),
                                  pad_token_id=AutoTokenizer.from_pretrained(base).pad_token_id)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    rm.save_pretrained(tmp_path / "rm")
    (tmp_path / "rm/reward_stats.json").write_text('{"mean": 1.5, "std": 0.3, "n": 8, "split": "val"}')
    critic = partial(SeparateCritic, model=ModelSpec(name_or_path=str(tmp_path / "rm")), init_from_score=True)
    module = make_module(base, tmp_path, value_head=critic, mini_batch_size=None)
    head = module.policy.value_head
    assert torch.equal(head.summary.weight, rm.score.weight.float())  # warm start from the RM's head
    # ... on the scale of the rewards PPO sees: the scorer subtracts the RM's held-out mean, so does the critic
    # (a head at the raw scale starts 1.5 off every return, and at lr 5e-4 its bias cannot move that in 96 steps)
    assert head.summary.bias.item() == -1.5
    probe = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        raw = rm(input_ids=probe, attention_mask=torch.ones_like(probe)).logits[0, 0]
        value = head(input_ids=probe, attention_mask=torch.ones_like(probe))[0, -1]
    torch.testing.assert_close(value, raw - 1.5, rtol=1e-4, atol=1e-4)  # V(last token) = the centred score
    uncentred = SeparateCritic(8, model=ModelSpec(name_or_path=str(tmp_path / "rm")), init_from_score=True,
                               center=False)
    assert uncentred.summary.bias.item() == 0.0
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert "summary.weight" in trainable and any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith("summary.") for n in trainable)  # the critic's trunk is frozen

    batch = first_batch(module, make_data())
    rollout, _ = module.make_rollout(batch)
    C, mask = rollout.context_length, rollout.response_mask
    with torch.no_grad():  # the values are the critic's own, from its trunk, not the policy's hidden states
        expected = head(input_ids=rollout.query_responses, attention_mask=rollout.attention_mask)[:, C - 1 : -1]
    torch.testing.assert_close(rollout.values, expected.masked_fill(~mask, 0.0))
    assert rollout.values[mask].abs().min() > 0

    trainer(2).fit(module, make_data())
    lora_b = [p for n, p in head.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the critic's adapter learned
    exported = load_file(tmp_path / "ppo_out/step_2/value_head.safetensors")
    assert set(exported) == trainable  # adapter + head, not the critic's frozen trunk


def test_a_separate_reference_model_is_frozen_and_scores_the_reference_log_probs(tiny_sft_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from alpaca_rlhf.ppo import response_logprobs
    from alpaca_rlhf.ppo.rollout import position_ids_from_mask

    merged = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    before_sft = tiny_sft_run / "output/tiny/base"  # same tokenizer, other weights
    module = make_module(merged, tmp_path, ref_model=ModelSpec(name_or_path=str(before_sft)))
    assert module.ref_model is not None and not any(p.requires_grad for p in module.ref_model.parameters())
    assert not any(n.startswith("ref_model.") for n, p in module.named_parameters() if p.requires_grad)
    rollout, _ = module.make_rollout(first_batch(module, make_data()))
    qr, am, C = rollout.query_responses, rollout.attention_mask, rollout.context_length
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(before_sft)(
            input_ids=qr, attention_mask=am, position_ids=position_ids_from_mask(am)).logits[:, C - 1 : -1]
    expected = response_logprobs(logits, qr[:, C:], 1.0)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.ref_logprobs[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert rollout.kl[mask].abs().mean() > 0.1  # SFT moved the policy away from the untuned base

    same = make_module(merged, tmp_path, ref_model=ModelSpec(name_or_path=str(merged)))  # a copy of the start
    rollout, _ = same.make_rollout(first_batch(same, make_data()))
    torch.testing.assert_close(rollout.ref_logprobs, rollout.logprobs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_policy_with_checkpointing_and_quantized_reward_model(tiny_base, tmp_path, quantization):
    """The consumer-GPU shape of configs/ppo.yaml on a tiny model: k-bit policy + LoRA + gradient checkpointing,
    a k-bit reward model, the rollout forward reused: finite, ratio 1, the adapter and value head learn."""
    from transformers import AutoTokenizer

    from alpaca_rlhf.models import load_sequence_classifier
    from alpaca_rlhf.modules.scorers import RewardModelScorer

    rm = load_sequence_classifier(ModelSpec(name_or_path=str(tiny_base)),
                                  pad_token_id=AutoTokenizer.from_pretrained(tiny_base).pad_token_id)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(ModelSpec(name_or_path=str(tmp_path / "rm"), quantization=quantization))
    L.seed_everything(0)
    module = PPOModule(
        policy=ModelSpec(name_or_path=str(tiny_base), quantization=quantization, gradient_checkpointing=True),
        scorer=scorer, lora=LoraSpec(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"]),
        ppo=PPOHParams(ppo_epochs=2, mini_batch_size=None), generation=GenerationHParams(max_new_tokens=8),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, eps=1e-5), output_dir=str(tmp_path / "out"),
        save_freq=0, log_samples_every=0)
    kinds = {type(m).__name__ for m in module.modules()}
    assert ("Linear4bit" if quantization == "4bit" else "Linear8bitLt") in kinds
    head_before = module.policy.value_head.summary.weight.detach().clone()
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(dict(pl_module.last_stats))

    trainer(2, callbacks=[Record()]).fit(module, make_data())
    assert history[0]["ppo/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)
    assert not torch.equal(module.policy.value_head.summary.weight, head_before)
    assert (tmp_path / "out/step_2/adapter_model.safetensors").is_file()


def test_kl_estimator_swaps_by_dotted_path(tiny_sft_run, tmp_path):
    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path,
                         kl_estimator="alpaca_rlhf.ppo.rewards.kl_k3")
    from alpaca_rlhf.ppo.rewards import kl_k3

    assert module.estimator is kl_k3
    with pytest.raises(ValueError, match="kl_estimator"):
        make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path, kl_estimator="k9")


def test_checkpoint_is_small_and_resume_restores_controller_and_position(tiny_sft_run, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from alpaca_rlhf.ppo import AdaptiveKLController

    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"

    def run(iterations, kill_at=None, ckpt_path=None):
        L.seed_everything(0)
        module = make_module(base, tmp_path)
        module.kl_ctl = AdaptiveKLController(0.2, target=0.01, horizon=10)  # moves fast, so restoring shows
        module.overwrite_output_dir = True  # the straight and the killed run share an output_dir
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True)]
        if kill_at:
            from tests.helpers import KillAtStep

            callbacks.append(KillAtStep(kill_at))
        t = L.Trainer(max_epochs=1, limit_train_batches=iterations, accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=callbacks)
        t.fit(module, make_data(), ckpt_path=ckpt_path)
        return module

    straight = run(4)
    straight_state = {k: v.clone() for k, v in straight.policy.state_dict().items() if "lora_" in k}
    (tmp_path / "ckpt/last.ckpt").unlink()
    with pytest.raises(RuntimeError, match="killed"):
        run(4, kill_at=9)  # 2 epochs x 2 minibatches = 4 optimizer steps per iteration: killed in iteration 3
    ckpt = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    assert ckpt["ppo"]["iteration"] == 2 and ckpt["ppo"]["kl_controller"]["value"] != 0.2
    assert all("lora_" in k or "value_head" in k for k in ckpt["state_dict"])
    assert ckpt["PromptDataModule"]["batches_done"] == 2
    resumed = run(4, ckpt_path=tmp_path / "ckpt/last.ckpt")
    assert resumed.iteration == 4 and resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value, rel=1e-9)
    for k, v in straight_state.items():  # same data order and seeded sampling: the same adapter
        torch.testing.assert_close(resumed.policy.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_export_loads_for_inference_on_the_merged_sft_model(tiny_sft_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    module = make_module(base, tmp_path)
    trainer(2).fit(module, make_data())
    step = tmp_path / "ppo_out/step_2"
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "tokenizer.json",
            "template.json", "ppo_state.json"} <= {p.name for p in step.iterdir()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), step)
    policy_state = module.policy.lm.state_dict()
    loaded = model.state_dict()
    for k in (k for k in policy_state if "lora_B" in k):
        torch.testing.assert_close(loaded[k], policy_state[k])
    head = load_file(step / "value_head.safetensors")
    torch.testing.assert_close(head["summary.weight"], module.policy.value_head.summary.weight.detach())


@pytest.mark.slow
def test_rule_based_reward_rises(tiny_sft_run, tmp_path):
    """(a) A rule-based reward (fraction of response tokens from a small set) rises; KL finite, nothing NaN."""
    L.seed_everything(0)
    lora = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path, lr=1e-2, lora=lora,
                         ppo_epochs=4, mini_batch_size=8)
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(dict(pl_module.last_stats))

    dm = PromptDataModule(SAMPLE, val_set_size=8, batch_size=16, max_prompt_length=96, seed=1)
    trainer(36, callbacks=[Record()]).fit(module, dm)
    scores = [h["rollout/score"] for h in history]
    first, last = sum(scores[:6]) / 6, sum(scores[-6:]) / 6
    assert last > first + 0.05 and last > 1.5 * first, scores
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert max(h["rollout/kl"] for h in history) < 50


def test_a_new_run_never_mixes_with_an_old_runs_exports(tiny_sft_run, tmp_path):
    """A shorter rerun into the same output_dir used to leave the old run's step_30 as the "latest" export."""
    import json

    from alpaca_rlhf.inference import latest_export

    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    old = tmp_path / "ppo_out/step_30"
    old.mkdir(parents=True)
    (old / "ppo_state.json").write_text(json.dumps({"iteration": 30, "finished": True}))
    (old / "adapter_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="step_30.*overwrite_output_dir"):
        trainer(2).fit(make_module(base, tmp_path), make_data())
    module = make_module(base, tmp_path)
    module.overwrite_output_dir = True
    trainer(2).fit(module, make_data())
    exports = sorted(p.name for p in (tmp_path / "ppo_out").glob("step_*"))
    assert exports == ["step_2"] and latest_export(tmp_path / "ppo_out").name == "step_2"
    # an old run's higher step cannot win over the run's own finished export either
    (old).mkdir()
    (old / "ppo_state.json").write_text(json.dumps({"iteration": 30, "finished": False}))
    (old / "adapter_config.json").write_text("{}")
    assert latest_export(tmp_path / "ppo_out").name == "step_2"


def test_resume_asked_for_after_a_kill_before_the_first_checkpoint_starts_over(tiny_sft_run, tmp_path):
    """Found by bench/kill_stress.py (issue 23 #17): a kill after the first step_<n> export and before the first
    checkpoint left an unfinished export and no checkpoint; `--ckpt_path last` then found nothing to resume, so
    the run started over and refused the export as another run's, telling the user to resume with
    --ckpt_path last (a loop). Now the unfinished exports of that killed run are replaced; finished ones (another
    run's results) are still refused."""
    import json

    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    killed = tmp_path / "ppo_out/step_1"
    killed.mkdir(parents=True)
    (killed / "ppo_state.json").write_text(json.dumps({"iteration": 1, "finished": False}))
    (killed / "adapter_config.json").write_text("{}")
    module = make_module(base, tmp_path)
    module.resume_requested = True  # what the CLI sets for --ckpt_path
    with pytest.warns(UserWarning, match="no checkpoint to resume"):
        trainer(2).fit(module, make_data(), ckpt_path="last")
    state = json.loads((tmp_path / "ppo_out/step_2/ppo_state.json").read_text())
    assert state["finished"] is True and not killed.exists()
    module = make_module(base, tmp_path)
    module.resume_requested = True
    with pytest.raises(FileExistsError, match="step_2"):  # a finished run is not replaced without being asked
        trainer(2).fit(module, make_data(), ckpt_path="last")


def test_value_head_stays_fp32_under_cpu_bf16_autocast():
    head = ValueHead(16, init_std=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert values.dtype == torch.float32


def test_dropout_copied_into_modules_is_off_too(tiny_tokenizer, tmp_path):
    """LLaMA's attention keeps its own `attention_dropout`; under gradient checkpointing the rollout runs in train
    mode, so a forgotten rate made the reference pass random."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alpaca_rlhf.models import disable_dropout

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
                         attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).train()
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7, 8]])
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # the rate is live in train mode
        disable_dropout(model)
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_rollout_sampling_ignores_the_checkpoints_generation_config(tiny_sft_run, tmp_path):
    import shutil

    from transformers import GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", base)
    biased = GenerationConfig(do_sample=True, min_p=0.5, typical_p=0.2, epsilon_cutoff=0.01, no_repeat_ngram_size=2,
                              bad_words_ids=[[5]], bos_token_id=1, eos_token_id=2)
    biased.save_pretrained(base)
    module = make_module(base, tmp_path)
    config = module.policy.lm.get_base_model().generation_config
    default = GenerationConfig()
    for field in ("min_p", "typical_p", "epsilon_cutoff", "no_repeat_ngram_size", "bad_words_ids"):
        assert getattr(config, field) == getattr(default, field), field
    assert config.eos_token_id == 2


def test_lora_bias_is_refused_with_the_adapter_disabled_reference(tiny_sft_run, tmp_path):
    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    with pytest.raises(ValueError, match="bias.*reference would drift"):
        make_module(base, tmp_path, lora=LoraSpec(r=4, target_modules=["q_proj"], bias="all"))


def test_gradient_accumulation_weights_micro_batches_by_valid_tokens(tiny_sft_run, tmp_path):
    """The minibatch loss is the token mean (docs/ppo.md §2.9): GA = 1 and GA = 2 give equal gradients even when the
    responses have unequal lengths (row weighting gave the short ones too much)."""
    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    grads = []
    for ga in (1, 2):
        torch.manual_seed(0)
        module = make_module(base, tmp_path, mini_batch_size=4, gradient_accumulation_steps=ga)
        module.manual_backward = lambda loss: loss.backward()  # no trainer attached here
        batch = first_batch(module, make_data(batch_size=4))
        rollout, _ = module.make_rollout(batch)
        lengths = rollout.response_mask.sum(1)
        if ga == 1:
            assert lengths.min() < lengths.max(), lengths  # unequal lengths, or the test proves nothing
        module.policy.train()
        with torch.no_grad():  # a moved adapter, so the ratio and the gradient are not trivial
            for p in module.policy.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
        list(module.minibatch_backward(rollout, torch.arange(4), module.micro_batch_size(4)))
        grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _token_targets(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok.convert_tokens_to_ids(t) for t in [".", ",", "Ġa", "Ġand", "Ġthe", "Ġin"]]


def test_one_nan_score_skips_that_update_and_the_run_finishes_finite(tiny_sft_run, tmp_path):
    """A NaN score in iteration 1 used to turn every adapter weight into NaN and crash later inside generate."""
    from tests.helpers import nan_scorer

    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    module = make_module(base, tmp_path, scorer=nan_scorer(_token_targets(base), nan_at=[1]))
    with pytest.warns(UserWarning, match="iteration 1: non-finite scores"):
        trainer(4).fit(module, make_data())
    assert module.iteration == 4 and module.skipped_iterations == 1
    assert module.last_stats["ppo/skipped_nonfinite"] == 1.0
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_a_scorer_that_always_fails_stops_clearly_and_keeps_the_last_good_checkpoint(tiny_sft_run, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import nan_scorer

    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"
    module = make_module(base, tmp_path, scorer=nan_scorer(_token_targets(base), nan_at=[2, 3, 4, 5, 6, 7]),
                         max_nonfinite_skips=3)
    t = L.Trainer(max_epochs=1, limit_train_batches=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True)])
    with pytest.raises(FloatingPointError, match="3 consecutive PPO iterations had non-finite scores"):
        t.fit(module, make_data())
    ckpt = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    assert ckpt["ppo"]["iteration"] == 2  # written after the good iterations, never after a skipped one
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert sorted(p.name for p in (tmp_path / "ppo_out").glob("step_*")) == ["step_2"]  # no export after a skip


def test_no_checkpoint_or_export_is_written_with_nan_weights():
    from alpaca_rlhf.guards import assert_finite

    with pytest.raises(FloatingPointError, match="lora_B"):
        assert_finite({"lora_A": torch.ones(2), "lora_B": torch.tensor([1.0, float("nan")])}, "checkpoint")


def test_ppo_resumed_after_its_last_step_writes_the_finished_export(tiny_sft_run, tmp_path):
    import json
    import shutil

    from lightning.pytorch.callbacks import ModelCheckpoint

    base = tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"

    def run(ckpt_path=None):
        module = make_module(base, tmp_path)
        module.save_freq = 0
        t = L.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0,
                      callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)])
        t.fit(module, make_data(), ckpt_path=ckpt_path)

    run()
    shutil.rmtree(tmp_path / "ppo_out/step_2")  # as if killed after the last checkpoint, before the export
    run(ckpt_path=str(tmp_path / "ckpt/last.ckpt"))
    assert json.loads((tmp_path / "ppo_out/step_2/ppo_state.json").read_text())["finished"] is True


def test_progress_bar_shows_score_kl_and_length(tiny_sft_run, tmp_path):
    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path)
    module.save_freq = 0
    t = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False)
    t.fit(module, make_data())
    shown = t.progress_bar_metrics
    assert {"score", "kl", "len"} <= set(shown), shown
    assert shown["len"] == pytest.approx(module.last_stats["rollout/response_length"])
    assert shown["score"] == pytest.approx(module.last_stats["rollout/score"])


def test_the_lr_schedule_steps_per_optimizer_step_and_ends_where_max_steps_does(tiny_sft_run, tmp_path):
    """Two iterations of 2 epochs x 2 minibatches = 8 optimizer steps: a linear decay sized by max_steps (8) must
    reach 0 there (stepped once per iteration it stood at 75% of the peak)."""
    from alpaca_rlhf.schedules import WarmupDecayLR

    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path, lr=1e-3)
    module.save_freq = 0
    module.scheduler_fn = lambda opt: WarmupDecayLR(opt, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    t = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False)
    t.fit(module, make_data())
    assert module.iteration == 2 and t.global_step == 8
    scheduler = t.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 8 and scheduler.last_epoch == 8
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # without max_steps the schedule is sized in optimizer steps too: iterations x epochs x minibatches
    module2 = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path / "b", lr=1e-3)
    module2.save_freq = 0
    module2.scheduler_fn = lambda opt: WarmupDecayLR(opt, warmup_steps=0, decay="linear", min_lr_ratio=0.0)
    trainer(3).fit(module2, make_data())
    assert trainer_scheduler_total(module2) == 3 * 2 * 2


def trainer_scheduler_total(module) -> int:
    return module.trainer.lr_scheduler_configs[0].scheduler.total_steps


def test_validation_shows_eos_refusal_and_empty_rates_and_beta_is_in_the_progress_bar(tiny_sft_run, tmp_path):
    from alpaca_rlhf.ppo import AdaptiveKLController

    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path)
    module.save_freq = 0
    module.kl_ctl = AdaptiveKLController(0.05, target=4.0, horizon=32)
    t = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", logger=False,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  num_sanity_val_steps=0)
    t.fit(module, make_data())
    metrics = t.callback_metrics
    for name in ("val/score", "val/kl", "val/response_length", "val/eos_rate", "val/refusal_rate", "val/empty_rate"):
        assert name in metrics, sorted(metrics)
    assert 0.0 <= float(metrics["val/eos_rate"]) <= 1.0 and 0.0 <= float(metrics["val/empty_rate"]) <= 1.0
    assert t.progress_bar_metrics["beta"] == pytest.approx(module.last_stats["ppo/kl_coef"])
    assert module.kl_ctl.value != 0.05  # a horizon sized for the run moves beta after one iteration of 8


@pytest.mark.parametrize("threshold", [0.5, None])
def test_ratio_threshold_zeroes_the_loss_of_runaway_micro_batches(tiny_sft_run, tmp_path, threshold):
    """TRL's classic guard: a micro-batch whose mean ratio exceeds the threshold adds no gradient. At 0.5 every
    micro-batch is over it (the ratio starts at exactly 1), so the adapter's B matrices never leave zero."""
    module = make_module(tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged", tmp_path,
                         ratio_threshold=threshold)
    module.save_freq = 0
    trainer(2).fit(module, make_data())
    lora_b = [p for n, p in module.policy.named_parameters() if "lora_B" in n]
    if threshold is None:
        assert any(p.abs().max() > 0 for p in lora_b) and "ppo/ratio_skipped" not in module.last_stats
    else:
        assert all(torch.equal(p, torch.zeros_like(p)) for p in lora_b)
        assert module.last_stats["ppo/ratio_skipped"] == 1.0
