"""Benchmark our PPO (PPOModule + PromptDataModule on Lightning) against TRL 1.12.0's experimental PPOTrainer.

Both sides run the same PPO iterations on the same random-weight models, built locally (nothing downloaded):
the policy is a LLaMA from `common.build_bases` (the tiny config's model, or 25M), the reward model a
one-label `AutoModelForSequenceClassification` of the same base saved as a merged-RM-like folder (its
`score` head random, `pad_token_id` set, no `reward_stats.json`: scores are not centred). The same prompt
batches come in the same order (the bundled Alpaca sample through our PromptDataModule: its seeded sampler's
order, left-padded by our collator on our side and by TRL's `DataCollatorWithPadding` on TRL's; the TRL
worker checks that the ids agree). Same LoRA (r, alpha, targets of configs/tiny/ppo.yaml, dropout 0) on the
policy, reference = policy with the adapter disabled, batch 16, one minibatch, 4 PPO epochs (4 optimizer
steps per iteration), up to 24 sampled tokens at temperature 1 with top_k 0 and top_p 1, EOS as the stop
token, fixed KL coefficient 0.05 (k1), clip 0.2 / 0.2, vf_coef 0.1, gamma 1, lambda 0.95, no reward
whitening, no missing-EOS penalty, no gradient clipping (TRL never clips), no early stopping, AdamW with a
constant learning rate (eps 1e-5, no weight decay), fp32, no gradient checkpointing, no evaluation, sample
generations, checkpoints, loggers or progress bars.

What differs is each framework's design, reported as it is:
- Value model. Ours: a scalar head on the policy's own last hidden state (one forward gives logits and
  values). TRL: a separate value model (here a copy of the RM, trained in full), so every training forward
  and backward runs two networks, and its optimizer holds the whole value model.
- Old log-probs. TRL takes them from the sampling scores of `generate`; ours recomputes them with a forward
  (so that the ratio is exactly 1 before the first update; that forward also gives the values). With one
  minibatch (as here) that forward keeps its autograd graph and serves the first optimizer step
  (`reuse_rollout_forward`, our default), so ours runs 3 training forwards per iteration and TRL 4.
- Stopping. Both generate up to `--max-new-tokens` and cut after the first EOS; `generate` stops early only
  when every row has finished. The table reports each side's mean response length (tokens through the first
  EOS) and generated width.
- TRL calls `gc.collect()` twice per iteration. It is timed (a wrapper around `gc.collect`) and reported; a
  third, clearly labelled variant runs TRL with `gc.collect` made a no-op.

Each timed run is a fresh process: `--warmup` iterations, then `--steps` timed ones. Episodes/s = prompts x
timed iterations / wall time from the end of the last warm-up iteration to the end of the last timed one
(data, generation, rollout forwards, scoring, GAE, optimisation, logging all inside); the CPU-time figure
divides by the process's CPU time instead. The time split comes from our `PPOModule.last_stats`
(`time/generation`, `time/scoring_and_forwards`, `time/optimization`) and, for TRL, from wrappers around its
`batch_generation`, its training `forward` and its optimizer's step. "Inside the models" is the time spent
in `generate`, in the outermost forward of any LLaMA network (policy, reference, value, reward) and in
`torch.autograd.backward`; the optimizer's `step` is shown on its own. Memory (CPU) is one more run per side
under `common.track_live_memory()`, over the first `--memory-iterations` batches (1: the optimizer state exists
after the first): peak RSS during training minus RSS before it (see bench/common.py). "weights MiB" adds up
the networks each side holds (TRL: policy, value and reward; ours: policy and reward).

    python bench/ppo.py                                # tiny and 25M, about 5-6 minutes on 2 CPU cores
    python bench/ppo.py --sizes tiny --steps 8 --repeats 3
    python bench/ppo.py --sizes tiny --profile ours    # cProfile of our worker: where the time goes
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    SAMPLE_DATA,
    MemoryMeter,
    build_bases,
    device_description,
    lightning_trainer,
    quiet,
    run_isolated,
    trl_lora_config,
)

TINY_PPO_CONFIG = ROOT / "configs" / "tiny" / "ppo.yaml"
PHASES = ("generation", "scoring", "optimization", "gc", "other")


def ppo_config() -> dict:
    """What both sides take from configs/tiny/ppo.yaml: LoRA, learning rate, Adam eps, batch, PPO settings."""
    import yaml

    cfg = yaml.safe_load(TINY_PPO_CONFIG.read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    opt = model["optimizer"]["init_args"]
    ppo, gen = model["ppo"], model["generation"]
    return {
        "lora": {k: v for k, v in model["lora"].items() if k != "modules_to_save"},
        "lr": float(opt["lr"]), "eps": float(opt.get("eps", 1e-8)),
        "batch_size": int(data["batch_size"]), "seed": int(cfg.get("seed_everything", 42)),
        "ppo_epochs": int(ppo["ppo_epochs"]), "max_new_tokens": int(gen["max_new_tokens"]),
        "temperature": float(gen["temperature"]), "clip_range": float(ppo["clip_range"]),
        "value_clip_range": float(ppo["value_clip_range"]), "vf_coef": float(ppo["vf_coef"]),
        "gamma": float(ppo["gamma"]), "lam": float(ppo["lam"]),
    }


def build_reward_model(base: str, target: str | os.PathLike, seed: int = 0) -> str:
    """A merged-RM-like folder: the base as a one-label sequence classifier, random `score`, pad id set."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from alpaca_rlhf.models import ModelSpec, load_tokenizer

    quiet()
    target = Path(target)
    if not (target / "config.json").is_file():
        tokenizer = load_tokenizer(ModelSpec(name_or_path=base))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)


def prompt_data(tokenizer, batch_size: int, max_prompt_length: int, seed: int):
    """Our PromptDataModule on the bundled sample, set up (no held-out prompts)."""
    from alpaca_rlhf.data.prompts import PromptDataModule

    data = PromptDataModule(data_path=str(SAMPLE_DATA), max_prompt_length=max_prompt_length, val_set_size=0,
                            batch_size=batch_size, num_workers=0, seed=seed)
    data.connect(tokenizer)
    data.setup("fit")
    return data


def prompt_order(data, iterations: int) -> list[int]:
    """Indices of the prompts our seeded sampler draws in the first `iterations` batches (first epoch)."""
    from alpaca_rlhf.data.sampling import SeededSampler

    n, batch = len(data.train_data), data.batch_size
    if iterations * batch > n:
        raise ValueError(f"{iterations} iterations of {batch} prompts need more than the {n} prompts kept "
                         "(raise --max-prompt-length or lower --warmup/--steps)")
    return SeededSampler(n, seed=data.seed).order(0)[: iterations * batch]


# ---- instrumentation, the same on both sides --------------------------------------------------------------
class Probe:
    """Cumulative time inside generate, model forwards, backward, optimizer steps and gc.collect.

    Model forwards count the outermost call of any LLaMA network (causal LM, sequence classifier or bare
    decoder) outside `generate`; `generate` counts as a whole. `iteration_end()` stamps wall and CPU time and
    a copy of the counters once per PPO iteration, with that iteration's phase split.
    """

    KEYS = ("generate", "forward", "backward", "optimizer", "gc")

    def __init__(self) -> None:
        self.acc = dict.fromkeys(self.KEYS, 0.0)
        self.gc_calls = 0
        self._depth, self._t0 = 0, 0.0
        self._hooked: set[int] = set()
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.snaps: list[dict] = []
        self.phases: list[dict] = []
        self.extras: list[dict] = []
        self.gen_widths: list[int] = []
        self.last_step_end = 0.0
        self.profiler = None  # a cProfile.Profile: runs over the timed iterations only
        self.warmup = self.total = 0

    def profile(self, warmup: int, steps: int, path: str | None = None) -> None:
        import cProfile

        self.profiler, self.warmup, self.total = cProfile.Profile(), warmup, warmup + steps
        self.profile_path = path

    # gc.collect: timed, or made a no-op (still timed, and counted)
    def patch_gc(self, off: bool = False) -> None:
        import gc

        original = gc.collect

        def collect(*args, **kwargs):
            t = time.perf_counter()
            try:
                return 0 if off else original(*args, **kwargs)
            finally:
                self.acc["gc"] += time.perf_counter() - t
                self.gc_calls += 1

        gc.collect = collect

    def patch_backward(self) -> None:
        import torch

        original = torch.autograd.backward

        def backward(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.acc["backward"] += time.perf_counter() - t

        torch.autograd.backward = backward  # Tensor.backward looks it up at call time

    def attach_models(self, *models) -> None:
        for model in models:
            for module in model.modules():
                name = type(module).__name__
                network = name.endswith(("ForCausalLM", "ForSequenceClassification")) or (
                    name.endswith("Model") and hasattr(module, "layers"))
                if network and id(module) not in self._hooked:
                    self._hooked.add(id(module))
                    module.register_forward_pre_hook(self._enter)
                    module.register_forward_hook(self._leave)

    def _enter(self, module, args) -> None:
        if self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += 1

    def _leave(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.acc["forward"] += time.perf_counter() - self._t0

    def wrap_generate(self, model) -> None:
        """Times `model.generate` (an instance attribute, so only this model) and records the generated width."""
        original = model.generate

        def generate(*args, **kwargs):
            t = time.perf_counter()
            self._depth += 1
            try:
                out = original(*args, **kwargs)
            finally:
                self._depth -= 1
                self.acc["generate"] += time.perf_counter() - t
            sequences = out if hasattr(out, "shape") else out.sequences
            self.gen_widths.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
            return out

        model.generate = generate

    def attach_optimizer(self, optimizer) -> None:
        state = {}

        def pre(opt, args, kwargs):
            state["t"] = time.perf_counter()

        def post(opt, args, kwargs):
            self.last_step_end = time.perf_counter()
            self.acc["optimizer"] += self.last_step_end - state["t"]

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)

    def iteration_end(self, phases: dict, **extra) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.snaps.append(dict(self.acc))
        self.phases.append(phases)
        self.extras.append(extra)
        if self.profiler is not None and len(self.ends) == self.warmup:
            self.profiler.enable()
        elif self.profiler is not None and len(self.ends) == self.total:
            self.profiler.disable()

    def window(self, warmup: int, steps: int, batch_size: int) -> dict:
        """Throughput and per-iteration means over iterations warmup+1 .. warmup+steps."""
        if steps == 0:  # a memory run
            return {}
        if len(self.ends) < warmup + steps:
            raise RuntimeError(f"{len(self.ends)} iterations ran; wanted {warmup} warm-up + {steps} timed")
        a, b = warmup - 1, warmup + steps - 1
        seconds, cpu = self.ends[b] - self.ends[a], self.cpu[b] - self.cpu[a]
        inside = {k: (self.snaps[b][k] - self.snaps[a][k]) / steps for k in self.KEYS}
        timed = range(warmup, warmup + steps)
        iters = [self.ends[i] - self.ends[i - 1] for i in timed]
        phase = {k: statistics.fmean(self.phases[i].get(k, 0.0) for i in timed) for k in PHASES[:-1]}
        phase["other"] = seconds / steps - sum(phase.values())
        episodes = batch_size * steps
        return {
            "episodes": episodes, "seconds": seconds, "cpu_seconds": cpu, "episodes_per_s": episodes / seconds,
            "episodes_per_cpu_s": episodes / cpu, "iteration_s": seconds / steps,
            "iteration_s_median": statistics.median(iters), "phases": phase, "inside": inside,
            "response_length": statistics.fmean(self.extras[i]["response_length"] for i in timed),
            "generated_width": statistics.fmean(self.gen_widths[warmup:warmup + steps] or [float("nan")]),
        }


def _profile_out(probe: Probe) -> dict:
    if probe.profiler is None:
        return {}
    if probe.profile_path:
        probe.profiler.dump_stats(probe.profile_path)
    return {"profile": profile_text(probe.profiler)}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def weights_mib(*models) -> float:
    """MiB of the distinct parameters and buffers of the networks a side holds (policy, value, reward)."""
    seen = {}
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


# ---- the two sides -----------------------------------------------------------------------------------------
def run_ours(path: str, rm_path: str, cfg: dict, batch_size: int, max_prompt_length: int, warmup: int,
             steps: int, gc_off: bool = False, profile: bool | str = False, precision: str = "32-true") -> dict:
    import lightning as L
    import torch

    from alpaca_rlhf import ppo as rl  # the pure-torch math of every RL method
    from alpaca_rlhf.models import LoraSpec, ModelSpec
    from alpaca_rlhf.modules.ppo import GenerationHParams, PPOHParams, PPOModule
    from alpaca_rlhf.modules.scorers import RewardModelScorer

    quiet()
    L.seed_everything(cfg["seed"], verbose=False)
    probe, memory, out = Probe(), MemoryMeter(), {}
    total = warmup + steps

    class Iterations(L.Callback):
        def on_train_start(self, trainer, pl_module):
            probe.attach_optimizer(trainer.optimizers[0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = pl_module.last_stats
            probe.iteration_end({"generation": s["time/generation"], "scoring": s["time/scoring_and_forwards"],
                                 "optimization": s["time/optimization"]},
                                response_length=s["rollout/response_length"],
                                ratio_error=abs(s["ppo/ratio_first_minibatch"] - 1.0))
            if len(probe.ends) == total:
                out.update(memory.stop())

    with tempfile.TemporaryDirectory() as tmp:
        module = PPOModule(
            policy=ModelSpec(name_or_path=path, dtype="float32"),
            scorer=RewardModelScorer(ModelSpec(name_or_path=rm_path, dtype="float32"), batch_size=batch_size),
            lora=LoraSpec(**cfg["lora"], modules_to_save=None),
            ppo=PPOHParams(ppo_epochs=cfg["ppo_epochs"], mini_batch_size=None, gradient_accumulation_steps=1,
                           clip_range=cfg["clip_range"], value_clip_range=cfg["value_clip_range"],
                           vf_coef=cfg["vf_coef"], gamma=cfg["gamma"], lam=cfg["lam"], whiten_rewards=False,
                           kl_estimator="k1", score_clip=None, missing_eos_penalty=None, early_stopping=False,
                           max_grad_norm=None, forward_batch_size=batch_size),
            generation=GenerationHParams(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"],
                                         top_k=0, top_p=1.0, seed=cfg["seed"]),
            kl_controller=rl.FixedKLController(0.05),  # TRL's kl_coef, fixed
            optimizer=functools.partial(torch.optim.AdamW, lr=cfg["lr"], eps=cfg["eps"], weight_decay=0.0),
            scheduler=None, output_dir=f"{tmp}/out", save_freq=0, log_samples_every=0,
        )
        module.on_train_end = lambda: None  # the final export is not part of training
        data = prompt_data(module.tokenizer, batch_size, max_prompt_length, cfg["seed"])
        probe.attach_models(module.policy, module.scorer)
        probe.wrap_generate(module.policy.lm)
        probe.patch_backward()
        trainer = lightning_trainer(tmp, [Iterations()], precision=precision, max_epochs=1,
                                    limit_train_batches=total)
        if profile:
            probe.profile(warmup, steps, profile if isinstance(profile, str) else None)
        memory.start()
        probe.patch_gc(off=gc_off)
        trainer.fit(module, datamodule=data)
        return {**probe.window(warmup, steps, batch_size), **out, "gc_calls": probe.gc_calls,
                "trainable": trainable(module.policy), "weights_mib": weights_mib(module.policy, module.scorer),
                **_profile_out(probe),
                "ratio_error": max(e["ratio_error"] for e in probe.extras)}  # |ratio - 1| before any update


def run_trl(path: str, rm_path: str, cfg: dict, batch_size: int, max_prompt_length: int, warmup: int,
            steps: int, gc_off: bool = False, profile: bool | str = False) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        PrinterCallback,
        ProgressCallback,
        TrainerCallback,
        set_seed,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from alpaca_rlhf.data.prompts import PromptCollator
    from alpaca_rlhf.models import ModelSpec, load_tokenizer

    quiet()
    gpu = torch.cuda.is_available()
    probe, memory, out = Probe(), MemoryMeter(), {}
    total = warmup + steps
    tokenizer = load_tokenizer(ModelSpec(name_or_path=path), padding_side="left")
    data = prompt_data(tokenizer, batch_size, max_prompt_length, cfg["seed"])
    prompts = [data.train_data[i] for i in prompt_order(data, total)]
    dataset = Dataset.from_list([{"input_ids": p["input_ids"]} for p in prompts])

    # phase marks of the current iteration, from wrappers around TRL's module-level helpers
    mark: dict = {}
    lengths: list[float] = []

    def batch_generation(*args, **kwargs):
        mark.clear()
        mark["gen_start"] = time.perf_counter()
        try:
            return original["batch_generation"](*args, **kwargs)
        finally:
            mark["gen_end"], mark["gc_at_gen_end"] = time.perf_counter(), probe.acc["gc"]

    def forward(model, *args, **kwargs):
        if "opt_start" not in mark and model is trainer.model:  # the first training forward of the iteration
            mark["opt_start"], mark["gc_at_opt_start"] = time.perf_counter(), probe.acc["gc"]
        return original["forward"](model, *args, **kwargs)

    def truncate_response(stop_token_id, pad_token_id, responses):
        post = original["truncate_response"](stop_token_id, pad_token_id, responses)
        lengths.append(trl_ppo.first_true_indices(post == pad_token_id).float().mean().item())
        return post

    original = {name: getattr(trl_ppo, name) for name in ("batch_generation", "forward", "truncate_response")}
    trl_ppo.batch_generation, trl_ppo.forward, trl_ppo.truncate_response = (batch_generation, forward,
                                                                            truncate_response)

    class Iterations(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            gc_now = probe.acc["gc"]
            phases = {"generation": mark["gen_end"] - mark["gen_start"],
                      "scoring": mark["opt_start"] - mark["gen_end"]
                      - (mark["gc_at_opt_start"] - mark["gc_at_gen_end"]),
                      "optimization": probe.last_step_end - mark["opt_start"],
                      "gc": gc_now - carry.get("gc", gc_now)}
            probe.iteration_end(phases, response_length=lengths[-1])
            carry["gc"] = gc_now  # TRL's second gc.collect of an iteration runs after this callback
            if len(probe.ends) == total:
                out.update(memory.stop())

    carry: dict = {}  # gc time at the end of the previous iteration
    set_seed(cfg["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(
            output_dir=tmp, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            num_mini_batches=1, num_ppo_epochs=cfg["ppo_epochs"], total_episodes=batch_size * total,
            learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            adam_epsilon=cfg["eps"], weight_decay=0.0,
            response_length=cfg["max_new_tokens"], stop_token="eos", temperature=cfg["temperature"],
            kl_coef=0.05, kl_estimator="k1", cliprange=cfg["clip_range"], cliprange_value=cfg["value_clip_range"],
            vf_coef=cfg["vf_coef"], gamma=cfg["gamma"], lam=cfg["lam"], whiten_rewards=False,
            missing_eos_penalty=None, local_rollout_forward_batch_size=batch_size,
            gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=not gpu,  # TRL defaults both on
            num_sample_generations=0, seed=cfg["seed"], report_to="none", save_strategy="no",
            eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        reward = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32)
        lora = cfg["lora"]
        trainer = PPOTrainer(
            args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
            train_dataset=dataset, value_model=value,
            peft_config=trl_lora_config(lora, "CAUSAL_LM"),
            callbacks=[Iterations()],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        # the batches in our sampler's order (TRL would shuffle with its own generator)
        trainer.dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True,
                                        collate_fn=trainer.data_collator)
        first = next(iter(trainer.dataloader))["input_ids"]
        ours = PromptCollator(tokenizer.pad_token_id)(prompts[:batch_size])["input_ids"]
        if not torch.equal(first, ours):
            raise AssertionError("TRL's collated prompt batch differs from ours")
        probe.attach_models(trainer.model, trainer.reward_model)
        probe.wrap_generate(trainer.model.policy)
        probe.attach_optimizer(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                               else trainer.optimizer)
        probe.patch_backward()
        if profile:
            probe.profile(warmup, steps, profile if isinstance(profile, str) else None)
        memory.start()
        probe.patch_gc(off=gc_off)
        with contextlib.redirect_stdout(io.StringIO()):  # TRL prints "===training policy==="
            trainer.train()
        return {**probe.window(warmup, steps, batch_size), **out, "gc_calls": probe.gc_calls,
                "trainable": trainable(trainer.model),
                "weights_mib": weights_mib(trainer.model, trainer.reward_model), **_profile_out(probe)}


def profile_text(profiler, top: int = 60) -> dict[str, str]:
    """The profiled window's top functions by own time and by cumulative time."""
    import pstats
    import sysconfig

    text = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(top)
        text[key] = buf.getvalue().replace(sysconfig.get_paths()["purelib"] + "/", "")
    return text


# ---- driver and tables -------------------------------------------------------------------------------------
def describe(res: dict) -> str:
    p = res["phases"]
    return (f"{res['episodes_per_s']:6.2f} ep/s, {res['episodes_per_cpu_s']:6.2f} ep/CPU-s, iteration "
            f"{res['iteration_s']:.2f} s (gen {p['generation']:.2f}, scoring {p['scoring']:.2f}, opt "
            f"{p['optimization']:.2f}, gc {p['gc']:.2f}, other {p['other']:.2f}), response "
            f"{res['response_length']:.1f} tok, peak RSS {res['peak_rss_mib']:.0f} MiB")


def run_all(workers: dict, repeats: int, memory_sides: list[str], memory_iterations: int, threads: int | None,
            **kwargs) -> dict:
    """Timed runs alternating the order of the sides every round, then one memory run per side in memory_sides
    (the first `memory_iterations` batches: the same batches on both sides)."""
    names = list(workers)
    results = {name: {"runs": [], "memory": None} for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run_isolated(workers[name], threads=threads, **kwargs)
            results[name]["runs"].append(res)
            print(f"  run {r + 1}/{repeats} {name:>9}: {describe(res)}", flush=True)
    for name in memory_sides:
        res = run_isolated(workers[name], threads=threads, live_memory=True,
                           **{**kwargs, "warmup": memory_iterations, "steps": 0})
        results[name]["memory"] = res
        print(f"  memory run {name:>9}: training adds {res['train_rss_mib']:.0f} MiB to "
              f"{res['baseline_rss_mib']:.0f} MiB (fixed mmap threshold: {res['live_memory']})", flush=True)
    return results


def med(runs: list[dict], key: str, sub: str | None = None) -> float:
    return statistics.median(r[key][sub] if sub else r[key] for r in runs)


def throughput_table(rows: list[dict]) -> str:
    head = ("| size | params | ours ep/s | TRL ep/s | speed ours/TRL | ours/TRL, CPU time | TRL no-gc ep/s | "
            "ours/TRL no-gc (CPU time) | ours train MiB | TRL train MiB | memory ours/TRL | weights MiB ours / TRL | "
            "peak RSS MiB ours / TRL |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        a, b, c = row["ours"]["runs"], row["TRL"]["runs"], row.get("TRL no-gc", {}).get("runs")
        ea, eb = med(a, "episodes_per_s"), med(b, "episodes_per_s")
        ca, cb = med(a, "episodes_per_cpu_s"), med(b, "episodes_per_cpu_s")
        ma, mb = (row[s]["memory"]["train_rss_mib"] if row[s]["memory"] else float("nan") for s in ("ours", "TRL"))
        cells = [row["size"], f"{row['params'] / 1e6:.1f}M", f"{ea:.2f}", f"{eb:.2f}", f"**{ea / eb:.2f}**",
                 f"{ca / cb:.2f}"]
        if c:
            ec, cc = med(c, "episodes_per_s"), med(c, "episodes_per_cpu_s")
            cells += [f"{ec:.2f}", f"**{ea / ec:.2f}** ({ca / cc:.2f})"]
        else:
            cells += ["-", "-"]
        cells += [f"{ma:,.0f}", f"{mb:,.0f}", f"**{ma / mb:.2f}**",
                  f"{_mib(a[0]['weights_mib'])} / {_mib(b[0]['weights_mib'])}",
                  f"{med(a, 'peak_rss_mib'):,.0f} / {med(b, 'peak_rss_mib'):,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mib(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def split_table(rows: list[dict]) -> str:
    head = ("| size | side | iteration s | generation | scoring + forwards | optimisation | gc.collect | other | "
            "inside models (gen + fwd + bwd) | optimizer.step | response tokens (width) | trainable params |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        for side in ("ours", "TRL", "TRL no-gc"):
            if side not in row:
                continue
            runs = row[side]["runs"]
            total = med(runs, "iteration_s")
            cells = [row["size"], side, f"{total:.2f}"]
            for k in PHASES:
                v = med(runs, "phases", k)
                cells.append(f"{v:.2f} ({100 * v / total:.0f}%)")
            inside = sum(med(runs, "inside", k) for k in ("generate", "forward", "backward"))
            step = med(runs, "inside", "optimizer")
            cells += [f"{inside:.2f} ({100 * inside / total:.0f}%)", f"{step:.3f} ({100 * step / total:.0f}%)",
                      f"{med(runs, 'response_length'):.1f} ({med(runs, 'generated_width'):.0f})",
                      f"{runs[0]['trainable'] / 1e6:.2f}M"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = ppo_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="tiny,25M", 
                        help="comma-separated: tiny, 25M, smol (the real SmolLM2-135M from ../shared/models)")
    parser.add_argument("--steps", default="6,2", help="timed PPO iterations per run: one number, or one per size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before them (at least 1)")
    parser.add_argument("--repeats", default="3,1", help="timed runs per side: one number, or one per size")
    parser.add_argument("--batch-size", type=int, default=cfg["batch_size"], help="prompts per iteration")
    parser.add_argument("--max-new-tokens", type=int, default=cfg["max_new_tokens"], help="response length cap")
    parser.add_argument("--max-prompt-length", type=int, default=64,
                        help="longer prompts are dropped (shorter prompts keep the 25M runs within minutes)")
    parser.add_argument("--no-gc-variant", default="tiny",
                        help="sizes (comma-separated, or 'all'/'none') that also run TRL with gc.collect a no-op")
    parser.add_argument("--no-memory-run", action="store_true", help="skip the separate CPU memory runs")
    parser.add_argument("--memory-iterations", type=int, default=1,
                        help="iterations of each memory run (the first batches; optimizer state exists after one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run; 0: torch's choice")
    parser.add_argument("--profile", choices=("ours", "TRL"), default=None,
                        help="instead of the comparison, run one side once per size under cProfile")
    parser.add_argument("--profile-dir", default=None, help="also write the raw cProfile stats there (.prof)")
    parser.add_argument("--workdir", default=None, help="where to build the random models; unset: a temp dir")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first iteration also builds the optimizer state)")
    quiet()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]

    def per_size(value: str) -> dict[str, int]:
        items = [int(v) for v in value.split(",")]
        return {s: items[min(i, len(items) - 1)] for i, s in enumerate(sizes)}

    steps, repeats = per_size(args.steps), per_size(args.repeats)
    no_gc = {"all": sizes, "none": []}.get(args.no_gc_variant, args.no_gc_variant.split(","))
    threads = args.threads or None
    cfg["max_new_tokens"] = args.max_new_tokens

    load_before, started = os.getloadavg()[0], time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        bases = build_bases(sizes, root)
        for size in sizes:
            path = bases[size]["path"]
            rm_path = build_reward_model(path, Path(root, f"{size}-rm"))
            print(f"{size}: {bases[size]['params'] / 1e6:.2f}M parameters", flush=True)
            kwargs = dict(path=path, rm_path=rm_path, cfg=cfg, batch_size=args.batch_size,
                          max_prompt_length=args.max_prompt_length, warmup=args.warmup, steps=steps[size])
            if args.profile:
                fn = {"ours": run_ours, "TRL": run_trl}[args.profile]
                dump = str(Path(args.profile_dir, f"{args.profile}-{size}.prof")) if args.profile_dir else True
                res = run_isolated(fn, threads=threads, profile=dump, **kwargs)
                print(f"  {args.profile} (under cProfile, timed iterations only): {describe(res)}")
                print("  inside per iteration: " + ", ".join(f"{k} {v:.3f} s" for k, v in res["inside"].items()))
                print(res["profile"]["tottime"])
                print(res["profile"]["cumulative"])
                continue
            workers = {"ours": run_ours, "TRL": run_trl}
            if size in no_gc:
                workers["TRL no-gc"] = functools.partial(run_trl, gc_off=True)
            results = run_all(workers, repeats[size], [] if args.no_memory_run else ["ours", "TRL"],
                              args.memory_iterations, threads, **kwargs)
            rows.append({"size": size, "params": bases[size]["params"], **results})
    if args.profile:
        return 0

    lora = cfg["lora"]
    print(f"\nPPO with LoRA, ours / TRL {version('trl')} experimental PPOTrainer on {device_description(threads)}. "
          f"Batch {args.batch_size} prompts (<= {args.max_prompt_length} tokens), 1 minibatch, "
          f"{cfg['ppo_epochs']} PPO epochs, <= {cfg['max_new_tokens']} new tokens at temperature "
          f"{cfg['temperature']}, LoRA r {lora['r']} alpha {lora['alpha']} on {','.join(lora['target_modules'])}, "
          f"AdamW lr {cfg['lr']}; {args.warmup} warm-up + "
          + ", ".join(f"{steps[s]} timed iterations x {repeats[s]} runs ({s})" for s in sizes)
          + f", medians; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"{time.perf_counter() - started:.0f} s in all.\n")
    print(throughput_table(rows))
    print("\nSeconds per iteration (median over runs of the mean over timed iterations) and share of it. "
          "TRL's gc.collect is its two explicit calls per iteration; 'TRL no-gc' makes them no-ops.\n")
    print(split_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
