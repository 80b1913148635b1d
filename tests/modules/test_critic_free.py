"""RLOOModule and GRPOModule on a tiny LLaMA: groups of k contiguous completions, no value model, the first
ratio exactly 1, micro-batches weighted per loss_type, exact resume, exports that inference loads, learning."""

import lightning as L
import pytest
import torch

from alpaca_rlhf.data import PromptDataModule
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.models import LoraSpec, ModelSpec
from alpaca_rlhf.modules import GRPOModule, RLOOModule
from alpaca_rlhf.modules.grpo import GRPOHParams
from alpaca_rlhf.modules.online import GenerationHParams
from alpaca_rlhf.modules.reinforce import ReinforceHParams, ReinforceModule
from alpaca_rlhf.modules.rloo import RLOOHParams
from alpaca_rlhf.modules.scorers import TokenIdScorer

SAMPLE = "alpaca_rlhf/data/samples/alpaca_sample.json"
LORA = LoraSpec(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def _targets(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok.convert_tokens_to_ids(t) for t in [".", ",", "Ġa", "Ġand", "Ġthe", "Ġin"]]


def make(algo, base, tmp_path, lr=1e-3, lora=LORA, max_new_tokens=12, **hp):
    cls, hp_cls, key = {"rloo": (RLOOModule, RLOOHParams, "rloo"), "grpo": (GRPOModule, GRPOHParams, "grpo"),
                        "reinforce": (ReinforceModule, ReinforceHParams, "reinforce")}[algo]
    return cls(policy=ModelSpec(name_or_path=str(base)), scorer=TokenIdScorer(_targets(base)), lora=lora,
               **{key: hp_cls(**{"num_generations": 4, "mini_batch_size": 8, **hp})},
               generation=GenerationHParams(max_new_tokens=max_new_tokens),
               optimizer=lambda p: torch.optim.AdamW(p, lr=lr, eps=1e-5), save_freq=2,
               output_dir=str(tmp_path / f"{algo}_out"), log_samples_every=0)


def make_data(batch_size=2, **kw):
    return PromptDataModule(SAMPLE, val_set_size=8, batch_size=batch_size, max_prompt_length=96, seed=1, **kw)


def trainer(iterations, **kw):
    return L.Trainer(max_epochs=1, limit_train_batches=iterations, accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, **kw)


def first_batch(module, dm):
    dm.connect(module.tokenizer)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.fixture
def base(tiny_sft_run):
    return tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"


def test_rloo_rollout_groups_k_samples_per_prompt_and_puts_the_kl_in_the_reward(base, tmp_path):
    module = make("rloo", base, tmp_path, beta=0.5)
    assert module.policy.value_head is None  # no critic
    batch = first_batch(module, make_data())
    with torch.no_grad():  # a moved adapter, so the KL is not zero and its place in the reward shows
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    rollout, samples = module.make_rollout(batch)
    P, C = batch["input_ids"].shape
    assert len(rollout) == P * 4 and rollout.values is None and rollout.returns is None
    prompts = rollout.query_responses[:, :C]
    for g in range(P):  # four rows per prompt, contiguous, the same prompt; the samples differ
        assert (prompts[g * 4 : g * 4 + 4] == batch["input_ids"][g]).all()
    assert len({tuple(r.tolist()) for r in rollout.query_responses[:4, C:]}) > 1
    kl_seq = ((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(1)
    assert kl_seq.abs().max() > 1e-3
    torch.testing.assert_close(rollout.rewards, rollout.scores - 0.5 * kl_seq)
    expected = torch.cat([F_rloo(g) for g in rollout.rewards.view(-1, 4)])
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.advantages, expected[:, None] * mask)
    # rloo/advantage_std is the std of the sequence advantages, not of advantage x response length
    stats = module.iteration_stats(rollout, samples)
    assert float(stats["rloo/advantage_std"]) == pytest.approx(expected.std().item(), rel=1e-5)
    assert mask.sum(1).float().std() > 0  # lengths differ: the old sum over tokens gave another number


def F_rloo(group):  # leave-one-out, written the slow way
    return torch.stack([group[i] - torch.cat([group[:i], group[i + 1 :]]).mean() for i in range(len(group))])


def test_grpo_rollout_advantages_are_group_normalised_and_kl_is_k3(base, tmp_path):
    module = make("grpo", base, tmp_path)
    batch = first_batch(module, make_data())
    rollout, _ = module.make_rollout(batch)
    adv = rollout.advantages.sum(1) / rollout.response_mask.sum(1).clamp(min=1)  # the sequence advantage
    groups = rollout.scores.view(-1, 4)
    expected = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(adv, expected)
    assert (rollout.kl == 0).all()  # fresh adapter: policy == reference, k3 = 0
    assert rollout.rewards is rollout.scores or torch.equal(rollout.rewards, rollout.scores)


def test_grpo_with_beta_zero_runs_no_reference_forward(base, tmp_path):
    module = make("grpo", base, tmp_path, beta=0.0)
    calls = []
    original = module.sampler.reference_logits
    module.sampler.reference_logits = lambda *a: calls.append(1) or original(*a)
    rollout, _ = module.make_rollout(first_batch(module, make_data()))
    assert calls == [] and rollout.ref_logprobs is None and torch.isnan(rollout.kl).all()


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_ratio_is_exactly_one_on_the_first_step_and_the_export_is_an_adapter(algo, base, tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = make(algo, base, tmp_path)
    assert all(m.p == 0 for m in module.modules() if isinstance(m, torch.nn.Dropout))
    trainer(2).fit(module, make_data())
    assert module.last_stats[f"{algo}/ratio_first_minibatch"] == 1.0  # reused rollout forward: exactly 1
    step = tmp_path / f"{algo}_out/step_2"
    names = {p.name for p in step.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "ppo_state.json", "template.json"} <= names
    assert "value_head.safetensors" not in names
    state = json.loads((step / "ppo_state.json").read_text())
    assert state["algorithm"] == algo and state["finished"] is True and state["samples_per_prompt"] == 4
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), step)
    ours = module.policy.lm.state_dict()
    moved = [k for k in ours if "lora_B" in k and ours[k].abs().sum() > 0]
    assert moved  # trained
    for k in moved:
        torch.testing.assert_close(model.state_dict()[k], ours[k])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_gradient_accumulation_gives_the_minibatch_loss_for_every_loss_type(base, tmp_path, loss_type):
    """Micro-batch weights (sequences' share for grpo/dr_grpo, tokens' share for bnpo) make GA = 1 and GA = 4
    the same gradient, with unequal response lengths."""
    grads = []
    for ga in (1, 4):
        torch.manual_seed(0)
        module = make("grpo", base, tmp_path, loss_type=loss_type, gradient_accumulation_steps=ga, beta=0.1)
        module.manual_backward = lambda loss: loss.backward()
        rollout, _ = module.make_rollout(first_batch(module, make_data()))
        lengths = rollout.response_mask.sum(1)
        assert lengths.min() < lengths.max(), lengths
        module.policy.train()
        with torch.no_grad():
            for p in module.policy.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
        list(module.minibatch_backward(rollout, torch.arange(8), module.micro_batch_size(8)))
        grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_bad_settings_are_refused(base, tmp_path):
    with pytest.raises(ConfigError, match="num_generations"):
        make("rloo", base, tmp_path, num_generations=1)
    with pytest.raises(ConfigError, match="loss_type"):
        make("grpo", base, tmp_path, loss_type="sum")


@pytest.mark.parametrize("algo", ["rloo", "grpo", "reinforce"])
def test_resume_is_bit_identical(algo, base, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import KillAtStep

    def run(kill_at=None, ckpt_path=None):
        L.seed_everything(0)
        module = make(algo, base, tmp_path, num_iterations=2, mini_batch_size=4)  # 4 optimizer steps/iteration
        module.overwrite_output_dir = True
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True)]
        if kill_at:
            callbacks.append(KillAtStep(kill_at))
        t = L.Trainer(max_epochs=1, limit_train_batches=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
        t.fit(module, make_data(), ckpt_path=ckpt_path)
        return module

    straight = run()
    want = {k: v.clone() for k, v in straight.policy.state_dict().items() if "lora_" in k}
    (tmp_path / "ckpt/last.ckpt").unlink()
    with pytest.raises(RuntimeError, match="killed"):
        run(kill_at=6)  # killed in iteration 2
    ckpt = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    assert ckpt[algo]["iteration"] == 1 and all("lora_" in k for k in ckpt["state_dict"])
    resumed = run(ckpt_path=tmp_path / "ckpt/last.ckpt")
    assert resumed.iteration == 3
    for k, v in want.items():
        assert torch.equal(resumed.policy.state_dict()[k], v), k  # bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["rloo", "grpo", "reinforce"])
def test_rule_based_reward_rises(algo, base, tmp_path):
    """A rule-based reward (the share of response tokens from a small set) rises; nothing NaN."""
    L.seed_everything(0)
    lora = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    module = make(algo, base, tmp_path, lr=1e-2, lora=lora, num_iterations=2, mini_batch_size=16, beta=0.01)
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(dict(pl_module.last_stats))

    trainer(30, callbacks=[Record()]).fit(module, make_data(batch_size=4))
    scores = [h["rollout/score"] for h in history]
    first, last = sum(scores[:6]) / 6, sum(scores[-6:]) / 6
    assert last > first + 0.05 and last > 1.5 * first, scores
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
