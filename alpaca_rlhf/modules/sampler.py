"""The rollout's sampler: generation, the no-grad forwards of policy, values and reference, and scoring, from
one prompt batch to scored `Samples`; no optimisation happens here (that is `online.OnlineRLModule`).

The order is OpenRLHF's: samples generator -> experience maker -> trainer. `Sampler.sample` is the first two
steps up to the scores; an algorithm's `build_rollout` turns `Samples` into its experience; the loop module
optimises it.

Conventions (docs/ppo.md §4, docs/algorithms.md): the score on the last valid token, masks through the first
stop token, log-probs of logits / temperature in fp32, the reference is the policy with its adapter off unless a
separate model is given, and a prompt's `samples_per_prompt` completions lie in contiguous rows (a group).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import CompileConfig, GenerationConfig

from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.evaluation import is_refusal
from alpaca_rlhf.models import SamplingSpec, null_to_none, unwrap_peft
from alpaca_rlhf.modules.policy import PolicyWithValue
from alpaca_rlhf.modules.scorers import Scorer, ScoringBatch
from alpaca_rlhf.ppo.rollout import position_ids_from_mask


@dataclass
class GenerationHParams(SamplingSpec):
    """Rollout sampling: compare's `SamplingSpec` (the same four decoding fields) with a rollout's own settings.
    Set explicitly, so a model's own generation_config.json cannot bias the KL.

    Attributes:
        max_new_tokens: Longest response (the seed's output_max_length; TRL's max_completion_length).
        temperature: Sampling temperature (1.0 by default, where compare's is 0); log-probs everywhere use
            logits / temperature.
        top_k: 0 = no truncation (anything else biases the KL estimate).
        top_p: 1.0 = no nucleus truncation.
        seed: Base seed of each iteration's sampling (seed + iteration, + rank): resumes sample alike.
        cache_implementation: The KV cache `generate` uses: None = transformers' dynamic cache (grows per token);
            "static" = preallocated for prompt + max_new_tokens (what compiled decoding needs).
        compile: torch.compile the decoding step (transformers' `CompileConfig`; needs cache_implementation
            "static"). The first iterations pay for compiling; a GPU gains most (bench/rollout.py). False also
            stops transformers from compiling a static cache on a GPU by itself.
        merge_adapter: Fold the LoRA weights into the base for generation and unfold them after (PEFT's
            merge_adapter / unmerge_adapter; TRL does the same before handing weights to vLLM): generation runs the
            plain network, without the adapter's extra matmuls per layer. Unquantized bases only. Folding and
            unfolding round: the base weights move by ~1 ulp per iteration (measured in tests/modules/
            test_rollout_speed.py), so a resumed run is no longer bit-identical to an unbroken one.
        logprob_gap: Record the log-probs of the sampled tokens as generation computed them and log
            `rollout/logprob_gap` (mean |generation - training forward| over response tokens) and
            `rollout/logprob_gap_max`: ~0 (float rounding of the KV-cached decoding) when sampling and training
            see the same policy; larger means the sampler is off-policy (a merge, a dtype, a bug).
    """

    temperature: float = 1.0
    seed: int | None = 42
    cache_implementation: str | None = None
    compile: bool = False
    merge_adapter: bool = False
    logprob_gap: bool = True

    def __post_init__(self) -> None:
        if null_to_none(self.cache_implementation) in (None, "dynamic"):
            self.cache_implementation = None
        if self.compile and self.cache_implementation != "static":
            raise ConfigError("generation.compile needs generation.cache_implementation: static (a compiled "
                              f"decoding step needs a fixed-size cache); got {self.cache_implementation!r}")


@dataclass
class RolloutHParams:
    """Settings every online method shares; each algorithm's hyperparameters extend these.

    Attributes:
        mini_batch_size: Completions per optimizer step; None = the whole batch (one step per epoch).
        gradient_accumulation_steps: Micro-batches per minibatch (memory: forward/backward this many at a time).
        score_clip: Clip processed scores to +-score_clip; None = no clipping.
        missing_eos_penalty: Subtracted from the score of a response that never emitted EOS (TRL); None = off.
        min_response_tokens: Responses with fewer tokens (EOS included) get `short_response_penalty` subtracted
            from their score: an early EOS costs reward (OpenAI's lm-human-preferences); None = off.
        short_response_penalty: The penalty of a too-short response; None = off.
        max_grad_norm: Gradient clipping by global norm; None = off.
        forward_batch_size: Completions per no-grad forward pass during the rollout (memory).
        reuse_rollout_forward: When one micro-batch is the whole batch (mini_batch_size None or >= batch,
            no accumulation), run the rollout's policy forward with autograd and let the first optimizer step
            use it instead of repeating it: the same numbers, one forward less per iteration.
        negative_kl_warning: Warn when the rollout KL (per sequence) falls below this (biased sampling).
        ratio_threshold: Skip (zero the loss of) a micro-batch whose mean ratio pi/pi_old exceeds this, as TRL's
            classic PPO did (`ratio_threshold`: loss spikes); counted in `<algo>/ratio_skipped`. None = off.
        max_nonfinite_skips: A NaN/inf score, reward, advantage, loss or gradient skips that update (no weight
            changes, `<algo>/skipped_nonfinite` counts it, a warning names the tensor and iteration); this many
            consecutive skipped iterations stop the run with an error.
    """

    mini_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    score_clip: float | None = None
    missing_eos_penalty: float | None = None
    min_response_tokens: int | None = None
    short_response_penalty: float | None = None
    max_grad_norm: float | None = 1.0
    forward_batch_size: int = 16
    reuse_rollout_forward: bool = True
    negative_kl_warning: float = -1.0
    ratio_threshold: float | None = 10.0
    max_nonfinite_skips: int = 3


@dataclass
class Samples:
    """One iteration's scored samples, before any algorithm turns them into experience (B completions)."""

    prompts: list[str]
    query_responses: Tensor  # (B, C+T)
    attention_mask: Tensor   # (B, C+T)
    response_mask: Tensor    # (B, T) bool, through the first EOS
    logprobs: Tensor         # (B, T) log pi_old, adapter on
    ref_logprobs: Tensor | None  # (B, T) reference; None when the algorithm needs none (GRPO with beta 0)
    values: Tensor | None    # (B, T) with a value head, zero outside the mask; else None
    raw_scores: Tensor       # (B,) the scorer's output
    scores: Tensor           # (B,) processed: centred, clipped, EOS-penalised
    has_eos: Tensor          # (B,) bool
    scoring_batch: ScoringBatch
    graph: tuple | None      # the rollout forward's outputs with autograd, for the first step (or None)
    timings: dict
    sampled_logprobs: Tensor | None = None  # (B, T) log-probs of the sampled tokens as generation computed them

    @property
    def context_length(self) -> int:
        return self.query_responses.shape[1] - self.response_mask.shape[1]


class Sampler:
    """Samples and scores completions of one prompt batch with the current policy (no weight changes).

    Args:
        policy: The policy (adapter on) with its optional value head; its adapter off is the reference.
        scorer: Maps prompts + responses to scores.
        tokenizer: The policy's tokenizer (left padding).
        stop_ids: Token ids that end a response (EOS, the chat template's end of turn).
        generation: Sampling settings (`gen`; the module's `gen` reads and sets this one).
        hparams: The shared rollout settings: forward batch size and the score processing.
        samples_per_prompt: Completions per prompt (k), in contiguous rows.
        ref_model: A separate frozen reference; None = the policy with its adapter disabled.
    """

    def __init__(self, policy: PolicyWithValue, scorer: Scorer, tokenizer, stop_ids: list[int],
                 generation: GenerationHParams, hparams: RolloutHParams, samples_per_prompt: int = 1,
                 ref_model: nn.Module | None = None) -> None:
        self.policy, self.scorer, self.tokenizer, self.stop_ids = policy, scorer, tokenizer, stop_ids
        self.gen, self.hp, self.k, self.ref_model = generation, hparams, samples_per_prompt, ref_model

    def generation_kwargs(self) -> dict:
        speed = dict(cache_implementation=self.gen.cache_implementation, disable_compile=not self.gen.compile)
        if self.gen.compile:  # transformers compiles only on accelerators unless told to on every device
            speed["compile_config"] = CompileConfig(fullgraph=False, dynamic=None)
            speed["compile_config"]._compile_all_devices = True
        return dict(do_sample=True, temperature=self.gen.temperature, top_k=self.gen.top_k, top_p=self.gen.top_p,
                    max_new_tokens=self.gen.max_new_tokens, min_new_tokens=0, repetition_penalty=1.0,
                    eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                    use_cache=True, **speed)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor,
                 record_logprobs: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """(responses (B, T) with pad after the first EOS, response_mask (B, T) bool, the sampled tokens'
        log-probs as generation computed them (B, T) if `record_logprobs`, else None)."""
        config = GenerationConfig(**self.generation_kwargs())
        if self.gen.cache_implementation == "static":  # sized in steps of 64: a new prompt width rarely recompiles
            config.max_cache_len = -(-(input_ids.shape[1] + self.gen.max_new_tokens) // 64) * 64
        recorder = SampledLogprobs(self.policy.lm.get_base_model(), self.gen.temperature, record_logprobs)
        with merged_adapter(self.policy.lm, self.gen.merge_adapter), recorder:
            out = self.policy.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        responses = out[:, input_ids.shape[1] :]
        response_mask = rl.first_eos_mask(responses, self.stop_ids)
        return (torch.where(response_mask, responses, self.tokenizer.pad_token_id), response_mask,
                recorder.result(responses))

    @torch.no_grad()
    def forward_old(self, query_responses: Tensor, attention_mask: Tensor, C: int, policy: bool = True,
                     with_values: bool = True, reference: bool = True):
        """Old log-probs and values (if `policy`; values if `with_values` and there is a value model) and
        reference log-probs (if `reference`), `forward_batch_size` rows at a time; what is not computed comes
        back as None."""
        logprobs, values, ref_logprobs = [], [], []
        responses = query_responses[:, C:]
        for i in range(0, query_responses.shape[0], self.hp.forward_batch_size):
            rows = slice(i, i + self.hp.forward_batch_size)
            if policy:
                logits, v = self.policy(query_responses[rows], attention_mask[rows], C, with_values=with_values)
                logprobs.append(rl.response_logprobs(logits, responses[rows], self.gen.temperature))
                if v is not None:
                    values.append(v)
            if reference:
                ref_logprobs.append(rl.response_logprobs(self.reference_logits(
                    query_responses[rows], attention_mask[rows], C), responses[rows], self.gen.temperature))
        cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
        return cat(logprobs), cat(values), cat(ref_logprobs)

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, C: int) -> Tensor:
        """Response-aligned logits of the reference: the policy with its adapter off, or `ref_model`."""
        if self.ref_model is None:
            return self.policy.reference_logits(input_ids, attention_mask, C)
        T = input_ids.shape[1] - C
        return self.ref_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              position_ids=position_ids_from_mask(attention_mask),
                              logits_to_keep=rl.response_positions(C, T, input_ids.device)).logits

    def scoring_batch(self, prompts: list[str], query_responses: Tensor, attention_mask: Tensor,
                      C: int) -> ScoringBatch:
        return ScoringBatch(prompts, query_responses, attention_mask, C, self.tokenizer, stop_ids=self.stop_ids)

    def sample(self, batch: dict, iteration: int = 0, rank: int = 0, keep_graph: bool = False,
               reference: bool = True) -> Samples:
        """Generate `samples_per_prompt` completions per prompt (contiguous rows), run the no-grad forwards and
        score them.

        With `keep_graph`, the policy's forward over the whole batch runs with autograd and its outputs come back
        in `graph`: the first optimisation step, when its micro-batch is the whole batch, takes them instead of
        running the same forward again. Same weights, no dropout: the numbers are the ones a second forward would
        give, so the first ratio is exactly 1 either way.
        """
        timings = {}
        t0 = time.perf_counter()
        if self.gen.seed is not None:
            self.seed(self.gen.seed + iteration * 1009 + rank * 100003)
        prompt_ids, prompt_mask, prompts = batch["input_ids"], batch["attention_mask"], list(batch["prompt"])
        if self.k > 1:
            prompt_ids = prompt_ids.repeat_interleave(self.k, 0)
            prompt_mask = prompt_mask.repeat_interleave(self.k, 0)
            prompts = [p for p in prompts for _ in range(self.k)]
        C = prompt_ids.shape[1]
        checkpointing = is_checkpointing(self.policy.lm)
        if checkpointing:
            self.policy.eval()  # under gradient checkpointing, transformers generates without a cache in train mode
        responses, response_mask, sampled_logprobs = self.generate(prompt_ids, prompt_mask, self.gen.logprob_gap)
        if checkpointing:
            self.policy.train()
        query_responses = torch.cat([prompt_ids, responses], 1)  # (B, C+T)
        attention_mask = torch.cat([prompt_mask, response_mask.long()], 1)
        timings["time/generation"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        graph = None
        if keep_graph:
            with torch.enable_grad():
                graph = self.policy(query_responses, attention_mask, C)
            logprobs = rl.response_logprobs(graph[0].detach(), responses, self.gen.temperature)
            values = graph[1].detach() if graph[1] is not None else None
            ref_logprobs = self.forward_old(query_responses, attention_mask, C, policy=False,
                                             reference=reference)[2]
        else:
            logprobs, values, ref_logprobs = self.forward_old(query_responses, attention_mask, C,
                                                               reference=reference)
        with torch.no_grad():
            if values is not None:
                values = values.masked_fill(~response_mask, 0.0)
            sb = self.scoring_batch(prompts, query_responses, attention_mask, C)
            raw_scores = self.scorer(sb).to(logprobs.device)
            has_eos = rl.contains_eos(responses, self.stop_ids)
            scores = rl.process_scores(raw_scores, contains_eos=has_eos,
                                      missing_eos_penalty=self.hp.missing_eos_penalty, score_clip=self.hp.score_clip,
                                      score_bias=-self.scorer.offset, response_lengths=response_mask.sum(1),
                                      min_response_tokens=self.hp.min_response_tokens,
                                      short_response_penalty=self.hp.short_response_penalty)
        timings["time/scoring_and_forwards"] = time.perf_counter() - t1
        return Samples(prompts=prompts, query_responses=query_responses, attention_mask=attention_mask,
                       response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                       raw_scores=raw_scores, scores=scores, has_eos=has_eos, scoring_batch=sb, graph=graph,
                       timings=timings, sampled_logprobs=sampled_logprobs)

    def held_out(self, batch: dict, seed: int | None) -> dict[str, Tensor]:
        """The current policy on one batch of held-out prompts, sampled under `seed` without touching the
        training's random state: mean score (uncentred), KL to the reference (nats per response), response
        length, and the rates of responses that ended, refused or were empty (a collapse shows in these while it
        happens, not only after training)."""
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            responses, mask, _ = self.generate(batch["input_ids"], batch["attention_mask"])
            C = batch["input_ids"].shape[1]
            qr = torch.cat([batch["input_ids"], responses], 1)
            am = torch.cat([batch["attention_mask"], mask.long()], 1)
            raw = self.scorer(self.scoring_batch(batch["prompt"], qr, am, C)).to(qr.device)
            logprobs, _, ref_logprobs = self.forward_old(qr, am, C, with_values=False)
            kl = rl.masked_sum(logprobs - ref_logprobs, mask, dim=1)
        texts = [t.strip() for t in self.tokenizer.batch_decode(responses, skip_special_tokens=True)]
        has_eos = rl.contains_eos(responses, self.stop_ids).float()
        rates = torch.tensor([[float(is_refusal(t)), float(not t)] for t in texts], device=qr.device)
        return {"val/score": (raw + self.scorer.offset).mean(), "val/kl": kl.mean(),
                "val/response_length": mask.sum(1).float().mean(), "val/eos_rate": has_eos.mean(),
                "val/refusal_rate": rates[:, 0].mean(), "val/empty_rate": rates[:, 1].mean()}

    def seed(self, seed: int) -> None:
        # torch.manual_seed also queues lazy CUDA seeding (a traceback per call)
        if next(self.policy.parameters()).device.type == "cpu":
            torch.random.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on, through a PEFT wrapper."""
    base = unwrap_peft(model)
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the first is transformers >= 5.x
        if hasattr(type(base), flag):
            return bool(getattr(base, flag))
    return False


def sampling_gap(samples: Samples) -> dict:
    """`rollout/logprob_gap` (mean) and `rollout/logprob_gap_max` of |log-prob at sampling - log pi_old| over the
    response tokens; nothing when generation's log-probs were not recorded."""
    if samples.sampled_logprobs is None:
        return {}
    mask = samples.response_mask
    gap = (samples.sampled_logprobs.to(samples.logprobs.device) - samples.logprobs).abs()[mask]
    if gap.numel() == 0:
        return {}
    return {"rollout/logprob_gap": gap.mean(), "rollout/logprob_gap_max": gap.max()}


class merged_adapter:
    """With `on`, the PEFT model's LoRA weights are folded into the base inside the block and unfolded after."""

    def __init__(self, model, on: bool) -> None:
        self.model, self.on = model, on

    def __enter__(self):
        if self.on:
            self.model.merge_adapter()
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            self.model.unmerge_adapter()


class SampledLogprobs:
    """Log-probs of the tokens `generate` samples, from the logits it sampled them from (hooks on the causal LM).

    Each decoding forward receives the token sampled from the previous forward's logits as its `input_ids`, so
    the pre-hook gathers that token's log-prob from the stored log-softmax of the previous step (one (B, V) at a
    time, never the (B, T, V) that `output_logits` would keep); `result()` adds the last sampled token's.
    Log-probs use logits / temperature in fp32, as the training forward's do."""

    def __init__(self, causal_lm: nn.Module, temperature: float, on: bool = True) -> None:
        self.lm, self.temperature, self.on = causal_lm, temperature, on
        self.previous: Tensor | None = None
        self.gathered: list[Tensor] = []
        self.handles = []

    def __enter__(self):
        if self.on:
            self.handles = [self.lm.register_forward_pre_hook(self._before, with_kwargs=True),
                            self.lm.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @torch.compiler.disable  # bookkeeping outside a compiled decoding step (no guards on the list's length)
    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.previous is not None and ids is not None:
            self.gathered.append(self.previous.gather(1, ids[:, -1:].to(self.previous.device)))

    @torch.compiler.disable
    def _after(self, module, args, output) -> None:
        logits = output.logits[:, -1].float()
        self.previous = torch.log_softmax(logits / self.temperature, dim=-1)

    def result(self, responses: Tensor) -> Tensor | None:
        """(B, T) log-probs of `responses` at sampling; None when off or when the steps do not line up."""
        if not self.on or self.previous is None:
            return None
        steps = [*self.gathered, self.previous.gather(1, responses[:, -1:].to(self.previous.device))]
        self.previous, self.gathered = None, []
        if len(steps) != responses.shape[1]:
            return None
        return torch.cat(steps, 1)
