"""The loop every online RL stage shares (PPO, RLOO, GRPO): the epoch/minibatch/micro-batch optimisation,
non-finite guards, logging, validation, checkpoints, exports and resume. The rollout itself (generation, the
no-grad forwards, the reference, scoring) is the sampler's (`modules/sampler.py`).

An algorithm subclasses `OnlineRLModule` and supplies only what is its own:
- `build_rollout(samples)`: advantages (and values, returns, rewards) from the scored samples;
- `micro_loss(mb, outputs)`: the loss of a micro-batch and its stats;
- optionally `micro_weight`, `stop_after_epoch`, `end_iteration`, `state`/`load_state`, `needs_reference`.

Dropout is off everywhere, so every forward of the same weights gives the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from alpaca_rlhf import exports
from alpaca_rlhf.data.templates import PromptTemplate
from alpaca_rlhf.guards import assert_finite, gradients_finite, nonfinite_rollout
from alpaca_rlhf.io import check_logs_outside
from alpaca_rlhf.models import (
    LoraSpec,
    ModelSpec,
    apply_lora,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    merge_adapter,
    neutral_generation_config,
)
from alpaca_rlhf.modules import tensorboard
from alpaca_rlhf.modules.adapter_stage import trim_checkpoint
from alpaca_rlhf.modules.policy import PolicyWithValue, check_policy_settings, check_tied_merge, input_model
from alpaca_rlhf.modules.sampler import (  # noqa: F401  (re-exported: their old home)
    GenerationHParams,
    RolloutHParams,
    SampledLogprobs,
    Sampler,
    Samples,
    is_checkpointing,
    merged_adapter,
    sampling_gap,
)
from alpaca_rlhf.modules.scorers import Scorer
from alpaca_rlhf.ppo.rollout import Rollout, minibatch_indices
from alpaca_rlhf.schedules import online_optimizer_steps, scheduler_config


class OnlineRLModule(L.LightningModule):
    """An on-policy RL stage on a merged SFT model with a fresh LoRA adapter; the reward comes from `scorer`.

    One prompt batch is one iteration: sample `samples_per_prompt` completions per prompt, score them, build the
    algorithm's experience, then `epochs()` x shuffled minibatches of the algorithm's loss under Lightning's
    manual optimisation.

    Args:
        model: The merged SFT checkpoint the policy starts from (and the reference, adapter disabled); `model`
            as in every stage.
        scorer: Maps prompts + responses to scores: `RewardModelScorer` (merged RM) or any `Scorer`.
        lora: The policy's fresh LoRA adapter (B = 0 at start, so policy == reference at iteration 0).
        hparams: The algorithm's hyperparameters (a `RolloutHParams` subclass).
        generation: Rollout sampling settings.
        value_head: Builds a value model from the trunk's hidden size; None = no value model (critic-free).
        ref_model: A separate frozen reference model; None = the policy with its adapter disabled (no copy).
        optimizer: Optimizer over the trainable parameters.
        scheduler: LR schedule stepped once per optimizer step (as `max_steps` counts); None = constant.
        output_dir: Inference exports land in `<output_dir>/step_<n>`; None = `output/<algorithm>`.
        save_freq: Export every this many iterations (and at the end of fit); 0 = only at the end.
        save_merged: Also write a merged standalone copy of the policy in each export (`merged/`).
        log_samples_every: Log a table of prompts, responses and scores every this many iterations.
        template: Prompt template (the SFT stage's).
        overwrite_output_dir: A new run (not a resume) whose `output_dir` holds another run's exports stops
            with an error unless this is true, in which case those exports are removed first.
        samples_per_prompt: Completions sampled per prompt (k), in contiguous rows.
        policy: The old name of `model` here, still read (with a warning).
    """

    ALGORITHM = "online"
    """The name in logs (`<ALGORITHM>/...`), checkpoints and exports."""

    def __init__(self, model: ModelSpec | None = None, scorer: Scorer | None = None, lora: LoraSpec = LoraSpec(),
                 hparams: RolloutHParams = RolloutHParams(), generation: GenerationHParams = GenerationHParams(),
                 value_head: Callable[[int], nn.Module] | None = None,
                 ref_model: ModelSpec | None = None, optimizer: OptimizerCallable = torch.optim.AdamW,
                 scheduler: LRSchedulerCallable | None = None, output_dir: str | None = None, save_freq: int = 100,
                 save_merged: bool = False, log_samples_every: int = 10, template: str = "alpaca",
                 overwrite_output_dir: bool = False, samples_per_prompt: int = 1,
                 policy: ModelSpec | None = None) -> None:
        super().__init__()
        policy = input_model(model, policy)
        check_policy_settings(self.ALGORITHM, policy, scorer, lora, generation, ref_model)
        self.overwrite_output_dir = overwrite_output_dir
        self.automatic_optimization = False
        self.policy_spec, self.hp, self.k = policy, hparams, samples_per_prompt
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.output_dir, self.save_freq, self.save_merged = self.export_folder(output_dir), save_freq, save_merged
        self.log_samples_every, self.template = log_samples_every, PromptTemplate.load(template)
        self.tokenizer = load_tokenizer(policy, padding_side="left")
        # a response ends at EOS or at the chat template's end of turn (<|eot_id|>, <|im_end|>): both stop it
        self.stop_ids = self.template.stop_token_ids(self.tokenizer)
        lm = load_causal_lm(policy)
        check_tied_merge(lm, lora, generation)
        self.policy = PolicyWithValue(apply_lora(lm, lora), value_head)
        neutral_generation_config(self.policy.lm)  # the rollout's sampling is exactly `generation`
        self.ref_model = load_causal_lm(ref_model, trainable=False) if ref_model else None
        self.scorer = scorer
        for model in (self.policy, self.ref_model, scorer):
            if model is not None:
                disable_dropout(model)  # Lightning calls .train(): p = 0 keeps every forward deterministic
        self.sampler = Sampler(self.policy, scorer, self.tokenizer, self.stop_ids, generation, hparams,
                               samples_per_prompt, self.ref_model)
        self.iteration = 0
        self.skipped_iterations = self.nonfinite_steps = self.consecutive_skips = 0
        self.last_stats: dict[str, float] = {}
        self.strict_loading = False  # checkpoints hold the trainable tensors only

    @classmethod
    def export_folder(cls, output_dir: str | None) -> Path:
        """Where a run of this algorithm exports: `output_dir`, or `output/<algorithm>` when it is None."""
        return Path(output_dir if output_dir is not None else f"output/{cls.ALGORITHM}")

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
        check_logs_outside(self, self.output_dir, "model.output_dir")
        if self.trainer.ckpt_path is None:
            exports.clear_earlier_exports(self.trainer, self.output_dir, self.ALGORITHM.upper(),
                                          getattr(self, "resume_requested", False), self.overwrite_output_dir)

    # ---- rollout: the sampler (modules/sampler.py) ------------------------------------------------------------
    @property
    def gen(self) -> GenerationHParams:
        """The rollout's sampling settings (the sampler's)."""
        return self.sampler.gen

    @gen.setter
    def gen(self, value: GenerationHParams) -> None:
        self.sampler.gen = value

    def generate(self, input_ids: Tensor, attention_mask: Tensor,
                 record_logprobs: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """The sampler's `generate`: (responses, response_mask, sampled log-probs or None)."""
        return self.sampler.generate(input_ids, attention_mask, record_logprobs)

    def sample(self, batch: dict, keep_graph: bool = False) -> Samples:
        """This iteration's scored samples of one prompt batch (the sampler's `sample`)."""
        return self.sampler.sample(batch, self.iteration, self.global_rank, keep_graph, self.needs_reference())

    def make_rollout(self, batch: dict, keep_graph: bool = False) -> tuple[Rollout, Samples]:
        """Sample, score and build the algorithm's detached experience from one prompt batch."""
        samples = self.sample(batch, keep_graph)
        t1 = time.perf_counter()
        with torch.no_grad():
            rollout = self.build_rollout(samples)
        samples.timings["time/scoring_and_forwards"] += time.perf_counter() - t1
        return rollout, samples

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
                if not gradients_finite(self.policy.parameters()):
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
        rollout, samples = self.make_rollout(batch, keep_graph=reuse)
        bad = nonfinite_rollout(rollout, samples.raw_scores, self._trainer)
        if bad:
            self.skip_nonfinite(bad)
            return
        t0 = time.perf_counter()
        before = self.nonfinite_steps
        graph, samples.graph = samples.graph, None
        stats = self.optimize(rollout, graph)
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
            "rollout/score_raw": samples.raw_scores.mean(), "rollout/kl": kl_per_seq,
            "rollout/response_length": mask.sum(1).float().mean(),
            "rollout/eos_fraction": samples.has_eos.float().mean(),
            f"{self.ALGORITHM}/lr": opt_lr(self.optimizers()),
            **self.iteration_stats(rollout, samples), **samples.timings, **sampling_gap(samples),
        })
        if kl_per_seq < self.hp.negative_kl_warning:
            rank_zero_warn(f"rollout KL is {kl_per_seq:.2f} nats per sequence: a clearly negative KL means "
                           "the sampling is biased (top_k/top_p/min_new_tokens set?)")
        self.end_iteration(kl_per_seq, episodes)
        self.log_stats(stats, len(rollout))
        tensorboard.add_histogram(self, "rollout/scores", rollout.scores, self.iteration)
        self.iteration += 1
        if self.log_samples_every and self.iteration % self.log_samples_every == 1 % self.log_samples_every:
            tensorboard.add_samples(self, samples.prompts, samples.scoring_batch.responses, rollout.scores,
                                    self.iteration)
        if self.save_freq and self.iteration % self.save_freq == 0:
            self.export(exports.step_name(self.iteration))

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
        # the same held-out samples for the same policy, run after run
        seed = None if self.gen.seed is None else self.gen.seed + batch_idx + 7919 * self.global_rank
        metrics = self.sampler.held_out(batch, seed)
        for key, value in metrics.items():
            self.log(key, value, batch_size=len(batch["prompt"]), sync_dist=True)

    # ---- optimizers, checkpoints, exports ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_fn([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_fn is None:
            return optimizer

        scheduler = self.scheduler_fn(optimizer)
        if getattr(scheduler, "total_steps", 0) is None:  # sized in optimizer steps, as it is stepped (`optimize`)
            scheduler.total_steps = self.planned_optimizer_steps()
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config(scheduler, self.trainer)}

    def planned_optimizer_steps(self) -> int:
        """The run's optimizer steps (the LR schedule's length and the progress total; `schedules`)."""
        return online_optimizer_steps(self.trainer, self.k, self.epochs(), self.hp.mini_batch_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
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
        self.export(exports.step_name(self.iteration), finished=True)  # its state says "finished": true

    def export(self, name: str, finished: bool = False) -> Path | None:
        """Writes `<output_dir>/<name>`: adapter (PEFT), value head if any, tokenizer, template and
        `ppo_state.json` (every online stage writes it under PPO's name: inference and the pipeline read it);
        whole or not at all."""
        if not self.trainer.is_global_zero:
            return None
        target = self.output_dir / name
        assert_finite({k: p for k, p in self.policy.named_parameters() if p.requires_grad}, f"export {target}")
        head = None
        if self.policy.value_head is not None:  # a separate critic's frozen trunk stays in its own folder
            head = {k: p.detach().cpu().contiguous() for k, p in self.policy.value_head.named_parameters()
                    if p.requires_grad}
        state = {"algorithm": self.ALGORITHM, "iteration": self.iteration, "finished": finished,
                 **self.export_state(), "base_model": self.policy_spec.name_or_path,
                 "log_dir": self.logger.log_dir if isinstance(self.logger, TensorBoardLogger) else None,  # curves
                 self.ALGORITHM: asdict(self.hp), "generation": asdict(self.gen), "samples_per_prompt": self.k}
        merge = (lambda folder: merge_adapter(str(folder), output_dir=str(folder / "merged"),  # noqa: E731
                                               dtype=self.policy_spec.dtype)) if self.save_merged else None
        return exports.export_rl(target, self.policy.lm, self.tokenizer, state, self.template.to_json(), head,
                                 merge)


def opt_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


