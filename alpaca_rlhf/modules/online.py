"""What every online RL stage shares (PPO, RLOO, GRPO): the policy and its reference, sampling, scoring, the
no-grad forwards of a rollout, the epoch/minibatch/micro-batch loop, non-finite guards, logging, checkpoints,
exports and resume.

An algorithm subclasses `OnlineRLModule` and supplies only what is its own:
- `build_rollout(samples)`: advantages (and values, returns, rewards) from the scored samples;
- `micro_loss(mb, outputs)`: the loss of a micro-batch and its stats;
- optionally `micro_weight`, `stop_after_epoch`, `end_iteration`, `state`/`load_state`, `needs_reference`.

Conventions (../shared/PPO.md section 6, ../shared/ALGORITHMS.md): score on the last valid token, masks through
the first EOS, log-probs of logits / temperature in fp32, dropout off everywhere, reference = the policy with its
adapter off, a prompt sampled `samples_per_prompt` times in contiguous rows (a group).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import save_file
from torch import Tensor, nn

from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.errors import ConfigError
from alpaca_rlhf.evaluation import is_refusal
from alpaca_rlhf.guards import assert_finite
from alpaca_rlhf.io import atomic_dir
from alpaca_rlhf.models import (
    LoraSpec,
    ModelSpec,
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    neutral_generation_config,
    null_to_none,
    touches_output_layer,
    unwrap_peft,
)
from alpaca_rlhf.modules.policy import PolicyWithValue
from alpaca_rlhf.modules.scorers import Scorer, ScoringBatch
from alpaca_rlhf.ppo.rollout import Rollout, minibatch_indices, position_ids_from_mask


@dataclass
class GenerationHParams:
    """Rollout sampling. Set explicitly, so a model's own generation_config.json cannot bias the KL.

    Attributes:
        max_new_tokens: Longest response (the seed's output_max_length; TRL's max_completion_length).
        temperature: Sampling temperature; log-probs everywhere use logits / temperature.
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

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
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


class OnlineRLModule(L.LightningModule):
    """An on-policy RL stage on a merged SFT model with a fresh LoRA adapter; the reward comes from `scorer`.

    One prompt batch is one iteration: sample `samples_per_prompt` completions per prompt, score them, build the
    algorithm's experience, then `epochs()` x shuffled minibatches of the algorithm's loss under Lightning's
    manual optimisation.

    Args:
        policy: The merged SFT checkpoint the policy starts from (and the reference, adapter disabled).
        scorer: Maps prompts + responses to scores: `RewardModelScorer` (merged RM) or any `Scorer`.
        lora: The policy's fresh LoRA adapter (B = 0 at start, so policy == reference at iteration 0).
        hparams: The algorithm's hyperparameters (a `RolloutHParams` subclass).
        generation: Rollout sampling settings.
        value_head: Builds a value model from the trunk's hidden size; None = no value model (critic-free).
        ref_model: A separate frozen reference model; None = the policy with its adapter disabled (no copy).
        optimizer: Optimizer over the trainable parameters.
        scheduler: LR schedule stepped once per optimizer step (as `max_steps` counts); None = constant.
        output_dir: Inference exports land in `<output_dir>/step_<n>`.
        save_freq: Export every this many iterations (and at the end of fit); 0 = only at the end.
        save_merged: Also write a merged standalone copy of the policy in each export (`merged/`).
        log_samples_every: Log a table of prompts, responses and scores every this many iterations.
        template: Prompt template (the SFT stage's).
        overwrite_output_dir: A new run (not a resume) whose `output_dir` holds another run's exports stops
            with an error unless this is true, in which case those exports are removed first.
        samples_per_prompt: Completions sampled per prompt (k), in contiguous rows.
    """

    ALGORITHM = "online"
    """The name in logs (`<ALGORITHM>/...`), checkpoints and exports."""

    def __init__(self, policy: ModelSpec, scorer: Scorer, lora: LoraSpec, hparams: RolloutHParams,
                 generation: GenerationHParams, value_head: Callable[[int], nn.Module] | None = None,
                 ref_model: ModelSpec | None = None, optimizer: OptimizerCallable = torch.optim.AdamW,
                 scheduler: LRSchedulerCallable | None = None, output_dir: str = "output/rl", save_freq: int = 100,
                 save_merged: bool = False, log_samples_every: int = 10, template: str = "alpaca",
                 overwrite_output_dir: bool = False, samples_per_prompt: int = 1) -> None:
        super().__init__()
        self.overwrite_output_dir = overwrite_output_dir
        self.automatic_optimization = False
        self.policy_spec, self.hp, self.gen, self.k = policy, hparams, generation, samples_per_prompt
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.output_dir, self.save_freq, self.save_merged = Path(output_dir), save_freq, save_merged
        self.log_samples_every, self.template = log_samples_every, PromptTemplate.load(template)
        if lora.bias != "none" and ref_model is None:
            raise ConfigError(f"lora.bias={lora.bias!r} trains the base model's biases, which disabling the adapter "
                             "does not undo: the reference would drift with the policy. Use bias: none, or give a "
                             "separate ref_model")
        if generation.merge_adapter and policy.quantization:
            raise ConfigError(f"generation.merge_adapter folds LoRA into the base weights, which a "
                              f"{policy.quantization} base cannot hold exactly; turn it off for a quantized policy")
        if generation.merge_adapter and policy.torch_dtype != torch.float32:
            raise ConfigError(f"generation.merge_adapter folds LoRA into {policy.dtype} base weights and out again "
                              "around every rollout: each round trip rounds the frozen base (also the reference) a "
                              "little further (0.02 relative after 400 rollouts); use policy.dtype float32 (with "
                              "bf16-mixed precision for speed) or turn merge_adapter off")
        self.tokenizer = load_tokenizer(policy, padding_side="left")
        # a response ends at EOS or at the chat template's end of turn (<|eot_id|>, <|im_end|>): both stop it
        self.stop_ids = self.template.stop_token_ids(self.tokenizer)
        lm = load_causal_lm(policy)
        if generation.merge_adapter and getattr(lm.config, "tie_word_embeddings", False) and touches_output_layer(lora):
            raise ConfigError("generation.merge_adapter with LoRA on lm_head of a model whose output layer is tied "
                              "to its input embeddings would fold the adapter into the shared embedding matrix: "
                              "generation would sample another policy. Leave lm_head out of lora.target_modules "
                              "(all-linear does) or turn merge_adapter off")
        self.policy = PolicyWithValue(apply_lora(lm, lora), value_head)
        neutral_generation_config(self.policy.lm)  # the rollout's sampling is exactly `generation`
        self.ref_model = load_causal_lm(ref_model, trainable=False) if ref_model else None
        self.scorer = scorer
        for model in (self.policy, self.ref_model, scorer):
            if model is not None:
                disable_dropout(model)  # Lightning calls .train(): p = 0 keeps every forward deterministic
        self.iteration = 0
        self.skipped_iterations = self.nonfinite_steps = self.consecutive_skips = 0
        self.last_stats: dict[str, float] = {}
        self.strict_loading = False  # checkpoints hold the trainable tensors only

    # ---- what an algorithm supplies ------------------------------------------------------------------------
    def build_rollout(self, samples: Samples) -> Rollout:
        """The algorithm's experience (advantages, ...) from one iteration's scored samples."""
        raise NotImplementedError

    def micro_loss(self, mb: Rollout, outputs: tuple[Tensor, Tensor | None] | None = None) -> tuple[Tensor, dict]:
        """(loss, stats) of one micro-batch; `outputs` = the policy's (logits, values) if already run.
        Stats carry `<ALGORITHM>/ratio` and `<ALGORITHM>/policy_kl`."""
        raise NotImplementedError

    def micro_weight(self, rollout: Rollout, part: Tensor, idx: Tensor) -> Tensor:
        """A micro-batch's share of its minibatch's loss: here its share of the valid tokens (a token mean over
        the minibatch, whatever the accumulation)."""
        mask = rollout.response_mask
        return mask[part].sum() / mask[idx.to(mask.device)].sum().clamp(min=1)

    def epochs(self) -> int:
        """Optimisation passes over each rollout batch."""
        return 1

    def needs_reference(self) -> bool:
        return True

    def stop_after_epoch(self, minibatch_kl) -> bool:
        return False

    def end_iteration(self, kl_per_seq: float, episodes: int) -> None:
        """After the optimisation (PPO updates its KL controller here)."""

    def iteration_stats(self, rollout: Rollout, samples: Samples) -> dict:
        """The algorithm's own per-iteration scalars."""
        return {}

    def state(self) -> dict:
        """The algorithm's own state for checkpoints."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def export_state(self) -> dict:
        """Extra keys of the export's `ppo_state.json`."""
        return {}

    # ---- set-up ----------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """A new run starts from an output folder without exports; a resume keeps its own."""
        from alpaca_rlhf.io import check_logs_outside

        check_logs_outside(self, self.output_dir, "model.output_dir")
        if self.trainer.ckpt_path is not None:
            return
        old = sorted(p.parent for p in self.output_dir.glob("step_*/ppo_state.json"))
        if not old:
            return
        killed_early = getattr(self, "resume_requested", False) and not any(
            json.loads((p / "ppo_state.json").read_text()).get("finished") for p in old)
        if killed_early:  # --ckpt_path last, yet no checkpoint: a run killed between its first export and its
            # first checkpoint; it starts over and writes these exports again (they were not finished)
            rank_zero_warn(f"--ckpt_path was given but there is no checkpoint to resume: {self.ALGORITHM.upper()} "
                           f"starts over and replaces the unfinished exports {', '.join(p.name for p in old)} in "
                           f"{str(self.output_dir)!r}, left by a run killed before its first checkpoint")
        elif not self.overwrite_output_dir:
            raise FileExistsError(
                f"{self.ALGORITHM.upper()} output_dir {str(self.output_dir)!r} holds exports of an earlier run "
                f"({', '.join(p.name for p in old)}); "
                "resume that run with --ckpt_path last, choose another output_dir, or set "
                "model.init_args.overwrite_output_dir: true to remove them")
        self.trainer.strategy.barrier()  # every rank has looked before rank 0 removes
        if self.trainer.is_global_zero:
            import shutil

            for folder in old:
                shutil.rmtree(folder)
        self.trainer.strategy.barrier()

    # ---- rollout ---------------------------------------------------------------------------------------------
    def generation_kwargs(self) -> dict:
        from transformers import CompileConfig

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
        from transformers import GenerationConfig

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
    def _forward_old(self, query_responses: Tensor, attention_mask: Tensor, C: int, policy: bool = True,
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

    def sample(self, batch: dict, keep_graph: bool = False) -> Samples:
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
            self._seed_sampling(self.gen.seed + self.iteration * 1009 + self.global_rank * 100003)
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
        graph, reference = None, self.needs_reference()
        if keep_graph:
            with torch.enable_grad():
                graph = self.policy(query_responses, attention_mask, C)
            logprobs = rl.response_logprobs(graph[0].detach(), responses, self.gen.temperature)
            values = graph[1].detach() if graph[1] is not None else None
            ref_logprobs = self._forward_old(query_responses, attention_mask, C, policy=False,
                                             reference=reference)[2]
        else:
            logprobs, values, ref_logprobs = self._forward_old(query_responses, attention_mask, C,
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
        return Samples(prompts, query_responses, attention_mask, response_mask, logprobs, ref_logprobs, values,
                       raw_scores, scores, has_eos, sb, graph, timings, sampled_logprobs)

    def make_rollout(self, batch: dict, keep_graph: bool = False) -> tuple[Rollout, dict]:
        """Sample, score and build the algorithm's detached experience from one prompt batch."""
        samples = self.sample(batch, keep_graph)
        t1 = time.perf_counter()
        with torch.no_grad():
            rollout = self.build_rollout(samples)
        samples.timings["time/scoring_and_forwards"] += time.perf_counter() - t1
        return rollout, {"raw_scores": samples.raw_scores, "has_eos": samples.has_eos,
                         "scoring_batch": samples.scoring_batch, "timings": samples.timings, "graph": samples.graph,
                         "samples": samples}

    def _seed_sampling(self, seed: int) -> None:
        if self.device.type == "cpu":  # torch.manual_seed also queues lazy CUDA seeding (a traceback per call)
            torch.random.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    # ---- optimisation ----------------------------------------------------------------------------------------
    def micro_batch_size(self, batch_size: int) -> int:
        mini = self.hp.mini_batch_size or batch_size
        return max(1, mini // self.hp.gradient_accumulation_steps)

    def minibatch_backward(self, rollout: Rollout, idx: Tensor, micro: int, graph: tuple | None = None):
        """Backward of one minibatch `idx` in micro-batches of `micro` rows; yields each micro-batch's (stats,
        weight), the weight being its share of the minibatch's loss (`micro_weight`)."""
        key = f"{self.ALGORITHM}/ratio"
        for part in idx.split(micro):
            part = part.to(rollout.logprobs.device)
            if graph is not None and len(part) == len(rollout):  # the whole batch: order does not change means
                loss, stats = self.micro_loss(rollout, graph)
            else:
                loss, stats = self.micro_loss(rollout.select(part))
            graph = None
            weight = self.micro_weight(rollout, part, idx)
            if self.hp.ratio_threshold is not None:  # no device sync: the loss is multiplied by 0 or 1
                keep = (stats[key] <= self.hp.ratio_threshold).to(loss.dtype)
                loss = loss * keep
                stats[f"{self.ALGORITHM}/ratio_skipped"] = 1.0 - keep
            self.manual_backward(loss * weight)
            yield stats, weight

    def _gradients_finite(self) -> bool:
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def nonfinite_rollout(self, rollout: Rollout, raw_scores: Tensor) -> list[str]:
        """Names of the rollout tensors holding NaN/inf on any rank (every rank decides alike)."""
        named = {"scores": raw_scores, "rewards": rollout.rewards, "advantages": rollout.advantages,
                 "returns": rollout.returns, "values": rollout.values, "logprobs": rollout.logprobs}
        named = {k: v for k, v in named.items() if v is not None}
        bad = torch.tensor([float(not torch.isfinite(t).all()) for t in named.values()], device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        return [name for name, flag in zip(named, bad.tolist(), strict=True) if flag > 0]

    def optimize(self, rollout: Rollout, graph: tuple | None = None) -> dict:
        """`epochs()` x shuffled minibatches; `graph` = the rollout forward's outputs for the first micro-batch."""
        if not self.policy.training:
            self.policy.train()
        opt, sched = self.optimizers(), self.lr_schedulers()
        B = len(rollout)
        mini = self.hp.mini_batch_size or B
        micro = self.micro_batch_size(B)
        generator = torch.Generator().manual_seed(self.iteration)
        sums, count, epochs_run = {}, 0, 0
        kl_key, ratio_key = f"{self.ALGORITHM}/policy_kl", f"{self.ALGORITHM}/ratio"
        for _ in range(self.epochs()):
            epochs_run += 1
            for idx in minibatch_indices(B, mini, generator):
                minibatch_kl = 0.0
                for stats, weight in self.minibatch_backward(rollout, idx, micro, graph):
                    graph = None  # only ever the first step: the weights change after it
                    minibatch_kl = minibatch_kl + stats[kl_key] * weight
                    if count == 0:
                        self.last_stats[f"{self.ALGORITHM}/ratio_first_minibatch"] = stats[ratio_key].item()
                    for k, v in stats.items():
                        sums[k] = sums[k] + v if k in sums else v
                    count += 1
                if not self._gradients_finite():
                    self.nonfinite_steps += 1
                    rank_zero_warn(f"iteration {self.iteration}: non-finite loss or gradient; optimizer step skipped "
                                   "(no weight changed)")
                    opt.zero_grad()
                    continue
                if self.hp.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=self.hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad()
                if sched is not None:  # per optimizer step: the schedule is sized in optimizer steps (max_steps)
                    sched.step()
            if self.stop_after_epoch(minibatch_kl):
                break
        out = {k: v / count for k, v in sums.items()}  # tensors: one device sync per iteration, at logging
        out[f"{self.ALGORITHM}/epochs_run"] = float(epochs_run)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> None:
        B = batch["input_ids"].shape[0] * self.k
        reuse = self.hp.reuse_rollout_forward and self.micro_batch_size(B) >= B
        rollout, extra = self.make_rollout(batch, keep_graph=reuse)
        bad = self.nonfinite_rollout(rollout, extra["raw_scores"])
        if bad:
            self.skip_nonfinite(bad)
            return
        t0 = time.perf_counter()
        before = self.nonfinite_steps
        stats = self.optimize(rollout, extra.pop("graph"))
        self.consecutive_skips = self.consecutive_skips + 1 if self.nonfinite_steps > before else 0
        if self.consecutive_skips >= self.hp.max_nonfinite_skips:
            raise FloatingPointError(f"{self.consecutive_skips} consecutive {self.ALGORITHM.upper()} iterations had "
                                     "non-finite losses or gradients; stopping (the last checkpoint holds the last "
                                     "finite weights)")
        stats[f"{self.ALGORITHM}/skipped_nonfinite"] = float(self.skipped_iterations + self.nonfinite_steps)
        stats["time/optimization"] = time.perf_counter() - t0
        mask = rollout.response_mask
        kl_per_seq = float(self.trainer.strategy.reduce(rollout.kl.sum(1).mean(), reduce_op="mean"))
        episodes = len(rollout) * self.trainer.world_size
        stats.update({
            "rollout/score": rollout.scores.mean(), "rollout/score_std": rollout.scores.std(unbiased=False),
            "rollout/score_raw": extra["raw_scores"].mean(), "rollout/kl": kl_per_seq,
            "rollout/response_length": mask.sum(1).float().mean(),
            "rollout/eos_fraction": extra["has_eos"].float().mean(),
            f"{self.ALGORITHM}/lr": opt_lr(self.optimizers()),
            **self.iteration_stats(rollout, extra["samples"]), **extra["timings"],
            **sampling_gap(extra["samples"]),
        })
        if kl_per_seq < self.hp.negative_kl_warning:
            rank_zero_warn(f"rollout KL is {kl_per_seq:.2f} nats per sequence: a clearly negative KL means "
                           "the sampling is biased (top_k/top_p/min_new_tokens set?)")
        self.end_iteration(kl_per_seq, episodes)
        self.log_stats(stats, len(rollout))
        self._log_histogram("rollout/scores", rollout.scores)
        self.iteration += 1
        if self.log_samples_every and self.iteration % self.log_samples_every == 1 % self.log_samples_every:
            self._log_samples(extra["samples"].prompts, extra["scoring_batch"].responses, rollout.scores)
        if self.save_freq and self.iteration % self.save_freq == 0:
            self.export(f"step_{self.iteration}")

    def skip_nonfinite(self, names: list[str]) -> None:
        """Skips this iteration's update because rollout tensors are not finite; stops after too many in a row."""
        self.skipped_iterations += 1
        self.consecutive_skips += 1
        name = self.ALGORITHM.upper()
        rank_zero_warn(f"{name} iteration {self.iteration}: non-finite {', '.join(names)}; update skipped, no weight "
                       f"changed ({self.consecutive_skips} in a row, {self.skipped_iterations} in all)")
        for logger in self.loggers:
            logger.log_metrics({f"{self.ALGORITHM}/skipped_nonfinite":
                                float(self.skipped_iterations + self.nonfinite_steps)}, step=self.iteration)
        self.iteration += 1
        if self.consecutive_skips >= self.hp.max_nonfinite_skips:
            raise FloatingPointError(
                f"{self.consecutive_skips} consecutive {name} iterations had non-finite {', '.join(names)} (last at "
                f"iteration {self.iteration - 1}); stopping. Check the scorer; the last checkpoint holds the last "
                "finite weights")

    MONITORED = ("rollout/score", "rollout/kl", "rollout/response_length")
    """Logged through `self.log` (callbacks such as ModelCheckpoint or EarlyStopping can monitor them) and shown
    in the progress bar as `score`, `kl` and `len`."""
    PROGRESS_BAR = {"rollout/score": "score", "rollout/kl": "kl", "rollout/response_length": "len"}

    def log_stats(self, stats: dict, batch_size: int) -> None:
        """Everything in `last_stats`; the monitored few via `self.log`, the rest straight to the loggers.

        Lightning's `self.log` costs ~0.3 ms per key (result collection); two dozen scalars every iteration
        were 3% of a tiny iteration. The x-axis is the iteration, as for `self.log` in `training_step`.
        """
        keys = list(stats)
        values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32, device=self.device)
                              for k in keys]).tolist()
        flat = dict(zip(keys, values, strict=True))
        self.last_stats.update(flat)
        self.log_dict({k: flat[k] for k in self.MONITORED}, on_step=True, batch_size=batch_size)
        self.log_dict({name: flat[k] for k, name in self.PROGRESS_BAR.items()}, on_step=True, prog_bar=True,
                      logger=False, batch_size=batch_size)
        every = max(1, self.trainer.log_every_n_steps)  # as Lightning decides for self.log
        if (self.iteration + 1) % every and not self.trainer.should_stop:
            return
        rest = {k: v for k, v in flat.items() if k not in self.MONITORED}
        for logger in self.loggers:
            logger.log_metrics(rest, step=self.iteration)

    # ---- validation: mean score of the current policy on held-out prompts -------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.policy.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if self.gen.seed is not None:  # the same held-out samples for the same policy, run after run
                torch.manual_seed(self.gen.seed + batch_idx + 7919 * self.global_rank)
            responses, mask, _ = self.generate(batch["input_ids"], batch["attention_mask"])
            C = batch["input_ids"].shape[1]
            qr = torch.cat([batch["input_ids"], responses], 1)
            am = torch.cat([batch["attention_mask"], mask.long()], 1)
            raw = self.scorer(self.scoring_batch(batch["prompt"], qr, am, C)).to(qr.device)
            logprobs, _, ref_logprobs = self._forward_old(qr, am, C, with_values=False)
            kl = rl.masked_sum(logprobs - ref_logprobs, mask, dim=1)
        n = len(raw)
        texts = [t.strip() for t in self.tokenizer.batch_decode(responses, skip_special_tokens=True)]
        has_eos = rl.contains_eos(responses, self.stop_ids).float()
        rates = torch.tensor([[float(is_refusal(t)), float(not t)] for t in texts], device=qr.device)
        self.log("val/score", (raw + self.scorer.offset).mean(), batch_size=n, sync_dist=True)
        self.log("val/kl", kl.mean(), batch_size=n, sync_dist=True)
        self.log("val/response_length", mask.sum(1).float().mean(), batch_size=n, sync_dist=True)
        # a collapse (short, evasive or empty answers) shows here while it happens, not only after training
        self.log("val/eos_rate", has_eos.mean(), batch_size=n, sync_dist=True)
        self.log("val/refusal_rate", rates[:, 0].mean(), batch_size=n, sync_dist=True)
        self.log("val/empty_rate", rates[:, 1].mean(), batch_size=n, sync_dist=True)

    # ---- optimizers, checkpoints, exports ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_fn([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_fn is None:
            return optimizer
        from alpaca_rlhf.schedules import scheduler_config

        scheduler = self.scheduler_fn(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:  # sized in optimizer steps, as it is stepped (`optimize`)
            scheduler.total_steps = self.planned_optimizer_steps()
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config(scheduler, self.trainer)}

    def planned_optimizer_steps(self) -> int:
        """The run's optimizer steps: `max_steps` when set (it counts optimizer steps here), else the planned
        iterations x epochs x minibatches per iteration (Lightning's estimate counts batches, i.e. iterations)."""
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        iterations = int(trainer.estimated_stepping_batches)
        datamodule = getattr(trainer, "datamodule", None)
        batch = getattr(datamodule, "batch_size", None)
        if not batch:
            return iterations
        completions = batch * self.k
        minibatches = -(-completions // (self.hp.mini_batch_size or completions))
        return iterations * self.epochs() * minibatches

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from alpaca_rlhf.modules.adapter_stage import trim_checkpoint

        trim_checkpoint(self, checkpoint)
        checkpoint[self.ALGORITHM] = {"iteration": self.iteration,
                                      "skipped": [self.skipped_iterations, self.nonfinite_steps], **self.state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(self.ALGORITHM, {})
        self.load_state(state)
        self.iteration = state.get("iteration", 0)
        self.skipped_iterations, self.nonfinite_steps = state.get("skipped", [0, 0])

    def on_fit_end(self) -> None:
        # on_fit_end, not on_train_end: a resumed run that had already reached its last step skips the training
        # loop (and on_train_end) but still ends here, so a kill between the last checkpoint and the export heals
        self.export(f"step_{self.iteration}", finished=True)  # ppo_state.json says "finished": true

    def export(self, name: str, finished: bool = False) -> Path | None:
        """Writes `<output_dir>/<name>`: adapter (PEFT), value head if any, tokenizer, template and
        `ppo_state.json` (every online stage writes it under PPO's name: inference and the pipeline read it);
        whole or not at all."""
        if not self.trainer.is_global_zero:
            return None
        target = self.output_dir / name
        assert_finite({k: p for k, p in self.policy.named_parameters() if p.requires_grad}, f"export {target}")
        with atomic_dir(target) as tmp:
            self.policy.lm.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if self.policy.value_head is not None:
                head = {k: p.detach().cpu().contiguous() for k, p in self.policy.value_head.named_parameters()
                        if p.requires_grad}  # a separate critic's frozen trunk stays in its own folder
                save_file(head, str(tmp / "value_head.safetensors"))
            (tmp / "template.json").write_text(json.dumps(self.template.to_json(), indent=2))
            (tmp / "ppo_state.json").write_text(json.dumps({
                "algorithm": self.ALGORITHM, "iteration": self.iteration, "finished": finished,
                **self.export_state(), "base_model": self.policy_spec.name_or_path,
                "log_dir": self.logger.log_dir if isinstance(self.logger, TensorBoardLogger) else None,  # curves
                self.ALGORITHM: asdict(self.hp), "generation": asdict(self.gen),
                "samples_per_prompt": self.k}, indent=2))
            if self.save_merged:
                from alpaca_rlhf.models import merge_adapter

                merge_adapter(str(tmp), output_dir=str(tmp / "merged"), dtype=self.policy_spec.dtype)
        return target

    def _log_histogram(self, tag: str, values: Tensor) -> None:
        """This iteration's values as a TensorBoard histogram (rank 0: its own rollout)."""
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            self.logger.experiment.add_histogram(tag, values.detach().float().cpu(), self.iteration)

    def _log_samples(self, prompts: list[str], responses: list[str], scores: Tensor, n: int = 4) -> None:
        if not isinstance(self.logger, TensorBoardLogger) or not self.trainer.is_global_zero:
            return
        rows = ["| prompt | response | score |", "| --- | --- | --- |"]
        for p, r, s in list(zip(prompts, responses, scores.tolist(), strict=True))[:n]:
            instruction = p.split("### Instruction:")[-1].split("### Response:")[0].strip()
            rows.append(f"| {md(instruction)} | {md(r)} | {s:.3f} |")
        self.logger.experiment.add_text("samples/rollout", "\n".join(rows), self.iteration)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on, through a PEFT wrapper."""
    base = unwrap_peft(model)
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the first is transformers >= 5.x
        if hasattr(type(base), flag):
            return bool(getattr(base, flag))
    return False


def md(text: str, limit: int = 300) -> str:
    return text[:limit].replace("|", "\\|").replace("\n", " ")


def opt_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


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
