"""The faster generation paths of a rollout (static KV cache, compiled decoding, adapter merged for generation)
and the health metric that watches them: the log-probs generation sampled from against the training forward's.

Speed itself is measured by bench/rollout.py, never here."""

import copy

import pytest
import torch
from test_ppo import LORA, first_batch, make_data, make_module, trainer

from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.modules.online import SampledLogprobs
from alpaca_rlhf.modules.ppo import GenerationHParams


def merged_base(tiny_sft_run):
    return tiny_sft_run / "output/tiny/lora-alpaca-adapter-merged"


def with_generation(module, **kw):
    module.gen = GenerationHParams(**{"max_new_tokens": 12, **kw})
    return module


def base_weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.lm.named_parameters() if "lora_" not in n}


def test_generation_logprobs_match_the_training_forward(tiny_sft_run, tmp_path):
    module = make_module(merged_base(tiny_sft_run), tmp_path)
    trainer(2).fit(module, make_data())  # the adapter is no longer zero
    samples = module.sample(first_batch(module, make_data()))
    gen, train, mask = samples.sampled_logprobs, samples.logprobs, samples.response_mask
    assert gen is not None and gen.shape == train.shape
    gap = (gen - train).abs()[mask]
    assert gap.max() < 1e-4, gap.max()  # KV-cached decoding vs one full forward: rounding only
    # one token off (the pre-hook gathering the wrong step) would be far from it
    assert (gen[:, 1:] - train[:, :-1]).abs()[mask[:, 1:]].mean() > 0.1
    assert module.last_stats["rollout/logprob_gap"] < 1e-4 and "rollout/logprob_gap_max" in module.last_stats


def test_logprob_gap_shows_an_off_policy_sampler(tiny_sft_run, tmp_path):
    """Sampling from the reference (adapter off) while training the policy must show as a gap."""
    module = make_module(merged_base(tiny_sft_run), tmp_path, lr=3e-2)
    trainer(2).fit(module, make_data())
    batch = first_batch(module, make_data())
    original = module.policy.generate

    def reference_generate(**kw):
        with module.policy.lm.disable_adapter():
            return original(**kw)

    module.policy.generate = reference_generate
    samples = module.sample(batch)
    assert (samples.sampled_logprobs - samples.logprobs).abs()[samples.response_mask].mean() > 1e-3


def test_the_recorder_is_off_when_asked(tiny_sft_run, tmp_path):
    module = with_generation(make_module(merged_base(tiny_sft_run), tmp_path), logprob_gap=False)
    samples = module.sample(first_batch(module, make_data()))
    assert samples.sampled_logprobs is None
    assert not module.policy.lm.get_base_model()._forward_hooks  # the hooks went with the block


def test_merged_adapter_samples_the_same_policy_and_restores_the_base(tiny_sft_run, tmp_path):
    module = make_module(merged_base(tiny_sft_run), tmp_path, lr=3e-2)
    trainer(2).fit(module, make_data())
    batch = first_batch(module, make_data())
    before = base_weights(module)
    with_generation(module, merge_adapter=True)
    samples = module.sample(batch)
    gap = (samples.sampled_logprobs - samples.logprobs).abs()[samples.response_mask]
    assert gap.max() < 1e-4, gap.max()  # merged weights give the adapter's policy
    after = base_weights(module)
    drift = max(float((after[n] - before[n]).abs().max()) for n in before)
    moved = sum(not torch.equal(after[n], before[n]) for n in before)
    assert drift < 1e-6 and moved > 0  # unfolding rounds (documented): small, and not silently exact
    assert all(not getattr(m, "merged", False) for m in module.policy.lm.modules())
    # the first ratio is still exactly 1: old log-probs come from the training forward, not from generation
    module2 = with_generation(make_module(merged_base(tiny_sft_run), tmp_path / "b"), merge_adapter=True)
    trainer(1).fit(module2, make_data())
    assert abs(module2.last_stats["ppo/ratio_first_minibatch"] - 1.0) < 1e-6


def test_static_cache_samples_what_the_dynamic_cache_samples(tiny_sft_run, tmp_path):
    module = make_module(merged_base(tiny_sft_run), tmp_path)
    trainer(1).fit(module, make_data())
    batch = first_batch(module, make_data())
    dynamic = module.sample(copy.copy(batch))
    static = with_generation(module, cache_implementation="static").sample(copy.copy(batch))
    assert torch.equal(dynamic.query_responses, static.query_responses)  # same seed, same tokens
    gap = (static.sampled_logprobs - static.logprobs).abs()[static.response_mask]
    assert gap.max() < 1e-4, gap.max()


@pytest.mark.slow
def test_compiled_decoding_samples_the_same_tokens(tiny_sft_run, tmp_path):
    module = make_module(merged_base(tiny_sft_run), tmp_path)
    batch = first_batch(module, make_data())
    plain = module.sample(copy.copy(batch))
    compiled = with_generation(module, cache_implementation="static", compile=True).sample(copy.copy(batch))
    assert torch.equal(plain.query_responses, compiled.query_responses)
    gap = (compiled.sampled_logprobs - compiled.logprobs).abs()[compiled.response_mask]
    assert gap.max() < 1e-4, gap.max()


def test_speed_settings_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="cache_implementation: static"):
        GenerationHParams(compile=True)
    assert GenerationHParams(cache_implementation="null").cache_implementation is None


def test_merging_into_a_quantized_base_is_refused(tiny_sft_run, tmp_path):
    from alpaca_rlhf.models import ModelSpec
    from alpaca_rlhf.modules import PPOModule
    from alpaca_rlhf.modules.ppo import PPOHParams
    from alpaca_rlhf.modules.scorers import TokenIdScorer

    spec = ModelSpec(name_or_path=str(merged_base(tiny_sft_run)), quantization="4bit")
    with pytest.raises(ConfigError, match="merge_adapter"):
        PPOModule(policy=spec, scorer=TokenIdScorer([1]), lora=LORA, ppo=PPOHParams(),
                  generation=GenerationHParams(merge_adapter=True), output_dir=str(tmp_path / "o"))


def test_merging_outside_fp32_or_into_tied_embeddings_is_refused(tiny_sft_run, tmp_path):
    """Merged generation in a bf16 base drifted the frozen base (the reference) with every rollout (0.02 relative
    after 400), and LoRA on a tied lm_head was folded into the shared embedding matrix (generation sampled another
    policy, log-prob gap 0.2). Both are refused before anything trains."""
    from alpaca_rlhf.models import LoraSpec, ModelSpec, build_tiny_base
    from alpaca_rlhf.modules import PPOModule
    from alpaca_rlhf.modules.ppo import PPOHParams
    from alpaca_rlhf.modules.scorers import TokenIdScorer

    def ppo(spec, lora=LORA, merge=True):
        return PPOModule(policy=spec, scorer=TokenIdScorer([1]), lora=lora, ppo=PPOHParams(),
                         generation=GenerationHParams(merge_adapter=merge), output_dir=str(tmp_path / "o"))

    bf16 = ModelSpec(name_or_path=str(merged_base(tiny_sft_run)), dtype="bfloat16")
    with pytest.raises(ConfigError, match="merge_adapter folds LoRA into bfloat16"):
        ppo(bf16)
    ppo(bf16, merge=False)  # without merging, a bf16 policy is fine
    tied = build_tiny_base(tmp_path / "tied", {"tie_word_embeddings": True})
    head = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="tied to its input embeddings"):
        ppo(ModelSpec(name_or_path=str(tied)), head)
    ppo(ModelSpec(name_or_path=str(tied)), LoraSpec(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))


def test_recorder_lines_up_steps_with_tokens():
    """Two decoding steps by hand: the pre-hook gathers step t's token from step t-1's logits."""

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.randn(5, 7)

        def forward(self, input_ids=None):
            return Out(self.table[input_ids])

    lm, tokens = LM(), torch.tensor([[3, 1, 4]])
    with (rec := SampledLogprobs(lm, temperature=2.0)):
        lm(input_ids=torch.tensor([[0, 2]]))  # prefill: logits of the position after token 2 choose token 3
        lm(input_ids=tokens[:, :1])
        lm(input_ids=tokens[:, 1:2])
    expected = torch.log_softmax(lm.table / 2.0, -1)[[2, 3, 1], [3, 1, 4]]
    assert torch.allclose(rec.result(tokens), expected[None])
