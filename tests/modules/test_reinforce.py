"""REINFORCE++-baseline, the method added as one file: its advantages against numbers worked by hand, its rollout
and export, and the pipeline and preflight taking it with no change of theirs (its exact resume and rising reward
are the critic-free tests', parametrized over it in test_critic_free.py)."""

import json
from pathlib import Path

import pytest
import torch

from alpaca_rlhf.ppo.critic_free import grpo_advantages, reinforce_baseline_advantages
from tests.modules.test_critic_free import first_batch, make, make_data, trainer

ROOT = Path(__file__).resolve().parents[2]


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
    module = make("reinforce", base, tmp_path, beta=0.5)
    assert module.policy.value_head is None and module.k == 4
    rollout, samples = module.make_rollout(first_batch(module, make_data()))
    torch.testing.assert_close(rollout.advantages[:, 0], reinforce_baseline_advantages(samples.scores, 4))
    assert (rollout.kl == 0).all()  # fresh adapter: policy == reference, k3 = 0
    trainer(2).fit(module, make_data())
    assert module.last_stats["reinforce/ratio_first_minibatch"] == 1.0
    state = json.loads((tmp_path / "reinforce_out/step_2/ppo_state.json").read_text())
    assert state["algorithm"] == "reinforce" and state["finished"] is True and state["reinforce"]["beta"] == 0.5


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
