"""REINFORCE++-baseline, the method added as one file: its advantages against numbers worked by hand, its rollout,
an exact resume, a rising rule-based reward, and the pipeline and preflight taking it with no change of theirs."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from alpaca_rlhf.models import LoraSpec, ModelSpec
from alpaca_rlhf.modules.reinforce import ReinforceHParams, ReinforceModule
from alpaca_rlhf.modules.sampler import GenerationHParams
from alpaca_rlhf.modules.scorers import TokenIdScorer
from alpaca_rlhf.ppo.critic_free import grpo_advantages, reinforce_baseline_advantages
from tests.modules.test_critic_free import LORA, _targets, first_batch, make_data, trainer

ROOT = Path(__file__).resolve().parents[2]


def make(base, tmp_path, lr=1e-3, lora=LORA, **hp):
    return ReinforceModule(
        reinforce=ReinforceHParams(**{"num_generations": 4, "mini_batch_size": 8, **hp}),
        policy=ModelSpec(name_or_path=str(base)), scorer=TokenIdScorer(_targets(base)), lora=lora,
        generation=GenerationHParams(max_new_tokens=12), optimizer=lambda p: torch.optim.AdamW(p, lr=lr, eps=1e-5),
        save_freq=2, output_dir=str(tmp_path / "reinforce_out"), log_samples_every=0)


@pytest.fixture
def base(tiny_sft_run):
    return tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"


def test_advantages_by_hand_one_scale_for_the_batch():
    # groups (0, 0.01) and (5, 6): centred -0.005, 0.005, -0.5, 0.5; their unbiased std over the batch is
    # sqrt((2 x 0.005^2 + 2 x 0.5^2) / 3) = 0.408268...
    adv = reinforce_baseline_advantages(torch.tensor([0.0, 0.01, 5.0, 6.0]), k=2, eps=0.0)
    std = ((2 * 0.005**2 + 2 * 0.5**2) / 3) ** 0.5
    torch.testing.assert_close(adv, torch.tensor([-0.005, 0.005, -0.5, 0.5]) / std)
    # GRPO scales each group by its own std: the near-tie becomes as large as the clear difference
    grpo, _ = grpo_advantages(torch.tensor([0.0, 0.01, 5.0, 6.0]), k=2, eps=0.0)
    assert grpo[1] == pytest.approx(grpo[3]) and adv[1] < 0.02 * adv[3]
    assert torch.equal(reinforce_baseline_advantages(torch.tensor([1.0, 1.0, 2.0, 2.0]), k=2), torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        reinforce_baseline_advantages(torch.ones(4), k=1)


def test_rollout_and_export(base, tmp_path):
    module = make(base, tmp_path, beta=0.5)
    assert module.policy.value_head is None and module.k == 4
    rollout, samples = module.make_rollout(first_batch(module, make_data()))
    torch.testing.assert_close(rollout.advantages[:, 0], reinforce_baseline_advantages(samples.scores, 4))
    assert (rollout.kl == 0).all()  # fresh adapter: policy == reference, k3 = 0
    trainer(2).fit(module, make_data())
    assert module.last_stats["reinforce/ratio_first_minibatch"] == 1.0
    state = json.loads((tmp_path / "reinforce_out/step_2/ppo_state.json").read_text())
    assert state["algorithm"] == "reinforce" and state["finished"] is True and state["reinforce"]["beta"] == 0.5


def test_resume_is_bit_identical(base, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import KillAtStep

    def run(kill_at=None, ckpt_path=None):
        L.seed_everything(0)
        module = make(base, tmp_path, num_iterations=2, mini_batch_size=4)
        module.overwrite_output_dir = True
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=True)]
        callbacks += [KillAtStep(kill_at)] if kill_at else []
        L.Trainer(max_epochs=1, limit_train_batches=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, callbacks=callbacks).fit(
            module, make_data(), ckpt_path=ckpt_path)
        return module

    want = {k: v.clone() for k, v in run().policy.state_dict().items() if "lora_" in k}
    (tmp_path / "ckpt/last.ckpt").unlink()
    with pytest.raises(RuntimeError, match="killed"):
        run(kill_at=6)
    resumed = run(ckpt_path=tmp_path / "ckpt/last.ckpt")
    assert resumed.iteration == 3 and all(torch.equal(resumed.policy.state_dict()[k], v) for k, v in want.items())


@pytest.mark.slow
def test_rule_based_reward_rises(base, tmp_path):
    L.seed_everything(0)
    lora = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    module = make(base, tmp_path, lr=1e-2, lora=lora, num_iterations=2, mini_batch_size=16, beta=0.01)
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append(dict(pl_module.last_stats))

    trainer(30, callbacks=[Record()]).fit(module, make_data(batch_size=4))
    scores = [h["rollout/score"] for h in history]
    first, last = sum(scores[:6]) / 6, sum(scores[-6:]) / 6
    assert last > first + 0.05 and last > 1.5 * first, scores


def test_the_pipeline_and_the_preflight_take_it_from_its_class():
    from alpaca_rlhf.cli import parse_fit_config
    from alpaca_rlhf.pipeline import CompareStage, FitStage, Stages, plan
    from alpaca_rlhf.preflight import estimate

    tiny = lambda name: FitStage(str(ROOT / f"configs/tiny/{name}.yaml"))  # noqa: E731
    stages, paths = plan(Stages(sft=tiny("sft"), rm=tiny("rm"), rl=tiny("reinforce"),
                                compare=CompareStage(str(ROOT / "configs/tiny/compare.yaml"))))
    assert [s.name for s in stages] == ["sft", "merge_sft", "rm", "merge_rm", "reinforce", "compare"]
    rl = stages[4]
    assert rl.online and paths["rl"] == "reinforce" and rl.output == Path("output/tiny/reinforce_checkpoints")
    assert "--model.init_args.scorer.init_args.model.name_or_path output/tiny/reward_model-adapter-merged" in \
        " ".join(rl.args)
    assert "--rlhf_model output/tiny/reinforce_checkpoints" in " ".join(stages[5].args)
    est = estimate(parse_fit_config(["--config", str(ROOT / "configs/tiny/reinforce.yaml")]), "meta-llama/Llama-3.1-8B")
    assert est.stage == "REINFORCE" and "value head" not in " ".join(c for c, _, _ in est.lines)
    kv = next(how for c, _, how in est.lines if c == "generation KV cache")
    assert kv.startswith("16 rollouts")  # 4 prompts x num_generations 4
