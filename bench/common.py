"""Shared plumbing for the benchmarks against TRL (bench/sft.py, later bench/rm.py and bench/ppo.py).

Each measurement runs in a fresh spawned process, so the two frameworks never share an allocator, a CUDA
context or a memory high-water mark. Inside it, a `StepMeter` counts the non-pad tokens the decoder receives
(a forward pre-hook, the same on both sides) and stamps the end of every optimizer step (a Lightning or a
transformers callback calls `step_end`); a `MemoryMeter` measures what training adds on top of the loaded
model and data. The parent interleaves the runs (ours, TRL, TRL, ours, ...) so that slow drift on a shared
machine falls on both, and reports medians.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# `python bench/sft.py` puts bench/ on sys.path, not the repository root
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_SFT_CONFIG = ROOT / "configs" / "tiny" / "sft.yaml"
SAMPLE_DATA = ROOT / "alpaca_rlhf" / "data" / "samples" / "alpaca_sample.json"
# ~25M parameters with the tiny 1024-token vocabulary: 8 x 3.02M in the blocks + 2 x 0.52M embedding/head.
# Multi-head attention (kv heads = heads) as in the LLaMA-1 7B that Alpaca fine-tuned.
LLAMA_25M = dict(hidden_size=512, intermediate_size=1280, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8)


def quiet_child() -> None:
    """Silences library chatter in a worker (progress bars, info logs, experimental-API notices)."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import; override them after

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers", "trl", "datasets",
                 "alpaca_rlhf", "peft",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def tiny_config() -> dict:
    """The parts of configs/tiny/sft.yaml both sides share: model dict, LoRA, learning rate, batch, length."""
    import yaml

    cfg = yaml.safe_load(TINY_SFT_CONFIG.read_text())
    model = cfg["model"]["init_args"]
    data = cfg["data"]["init_args"]
    return {
        "tiny": dict(model["model"]["tiny"]),
        "lora": {k: v for k, v in model["lora"].items() if k != "modules_to_save"},
        "lr": float(model["optimizer"]["init_args"]["lr"]),
        "batch_size": int(data["batch_size"]),
        "max_length": int(data["cutoff_len"]),
        "seed": int(cfg.get("seed_everything", 42)),
    }


def build_bases(sizes: list[str], root: str | os.PathLike) -> dict[str, dict]:
    """Random-weight LLaMA folders (with the locally trained 1024-token tokenizer) for each named size.

    Returns:
        {size: {"path": folder, "params": parameter count}}.
    """
    import json

    from alpaca_rlhf.models import TINY_LLAMA, build_tiny_base

    configs = {"tiny": tiny_config()["tiny"], "25M": LLAMA_25M}
    bases = {}
    for size in sizes:
        if size not in configs:
            raise ValueError(f"unknown size {size!r}; choose from {sorted(configs)}")
        path = Path(root, size)
        if not (path / "config.json").is_file():
            build_tiny_base(path, configs[size])
        cfg = {**TINY_LLAMA, **json.loads((path / "config.json").read_text())}
        bases[size] = {"path": str(path), "params": llama_params(cfg)}
    return bases


def llama_params(cfg: dict) -> int:
    """Parameter count of a LLaMA config (embeddings, blocks, final norm, untied head)."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return n * block + embed + h


class StepMeter:
    """Tokens and wall time per optimizer step.

    `attach(model)` hooks the decoder stack (LlamaModel) of a plain or PEFT-wrapped causal LM: every forward adds
    the number of non-pad input tokens (`attention_mask.sum()`; all of `input_ids` without a mask). The
    training framework's callback calls `step_end()` once per optimizer step, after the optimizer has stepped.
    """

    def __init__(self) -> None:
        self._tokens = 0
        self._pending = []  # token counts as tensors: summed without a device sync until step_end
        self.step_tokens: list[int] = []
        self.step_ends: list[float] = []
        self.start = time.perf_counter()

    def attach(self, model) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = base.get_decoder()
        decoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        if mask is not None and mask.dim() == 2:
            self._pending.append(mask.sum())
        else:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            self._pending.append(input_ids.numel())

    def step_end(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.step_tokens.append(int(sum(int(t) for t in self._pending)))
        self._pending = []

    def window(self, warmup: int, steps: int) -> dict:
        """Throughput over steps warmup+1 .. warmup+steps (timed from the end of step `warmup`)."""
        if len(self.step_ends) < warmup + steps:
            raise RuntimeError(f"only {len(self.step_ends)} steps ran; wanted {warmup} warm-up + {steps} timed")
        start = self.step_ends[warmup - 1] if warmup else self.start
        seconds = self.step_ends[warmup + steps - 1] - start
        tokens = sum(self.step_tokens[warmup:warmup + steps])
        step_times = [b - a for a, b in zip([start] + self.step_ends[warmup:], self.step_ends[warmup:warmup + steps])]
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "step_s_median": statistics.median(step_times), "steps": steps}


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kb() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


class MemoryMeter:
    """Peak memory of what runs between `start()` and `stop()`.

    CPU: the resident-set high-water mark. On Linux `start()` records the current RSS and resets the mark
    (`echo 5 > /proc/self/clear_refs`), so `stop()` gives the peak reached during training minus the RSS
    before it: activations, gradients, optimizer state and framework buffers on top of the loaded model and data.
    Where the mark cannot be reset, the delta is taken against `ru_maxrss` at `start()` (a lower bound).
    The whole-process peak (`getrusage(RUSAGE_SELF).ru_maxrss`) is reported too.
    GPU: `torch.cuda.max_memory_allocated()` over the whole process (both frameworks move the model to the
    device at different moments, so a delta would not compare like with like).
    """

    def start(self) -> None:
        import gc

        gc.collect()
        self.process_peak_before = _maxrss_kb()
        self.baseline_kb = _status_kb("VmRSS")
        self.reset = False
        if self.baseline_kb is not None:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset = True
            except OSError:
                pass
        if not self.reset:
            self.baseline_kb = self.process_peak_before

    def stop(self) -> dict:
        import torch

        peak_kb = _status_kb("VmHWM") if self.reset else _maxrss_kb()
        out = {
            "train_rss_mib": max(0, peak_kb - self.baseline_kb) / 1024,
            "baseline_rss_mib": self.baseline_kb / 1024,
            "peak_rss_mib": max(peak_kb, self.process_peak_before, _maxrss_kb()) / 1024,
        }
        if torch.cuda.is_available():
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def _child(conn, fn: Callable, kwargs: dict, threads: int | None) -> None:
    try:
        quiet_child()
        if threads:
            import torch

            torch.set_num_threads(threads)
        conn.send(("ok", fn(**kwargs)))
    except BaseException:  # noqa: B036 - report everything to the parent, then exit
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn: Callable, timeout: float | None = None, threads: int | None = None, **kwargs) -> dict:
    """Runs `fn(**kwargs)` in a fresh spawned Python process and returns its (picklable) result.

    `fn` must be importable by module path (a top-level function of the calling script, or a
    `functools.partial` of one). `threads` sets torch's intra-op threads there (default: torch's choice).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, kwargs, threads))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} gave no result within {timeout} s")
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", f"worker died (exit code {proc.join() or proc.exitcode})"
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its worker process:\n{payload}")
    return payload


def interleaved(workers: dict[str, Callable], repeats: int, log: Callable[[str], None] = print,
                **kwargs) -> dict[str, list[dict]]:
    """Runs each worker `repeats` times, each in its own process, alternating their order every round."""
    names = list(workers)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run_isolated(workers[name], **kwargs)
            results[name].append(res)
            mem = res.get("cuda_peak_mib", res["train_rss_mib"])
            log(f"  repeat {r + 1}/{repeats} {name:>5}: {res['tokens_per_s']:9.0f} tok/s "
                f"(median step {res['step_s_median'] * 1000:.0f} ms), train memory {mem:.0f} MiB")
    return results


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def spread(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    return f"{min(values):.0f}-{max(values):.0f}"


def device_description(threads: int | None = None) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{threads or torch.get_num_threads()} torch threads), torch {torch.__version__}")


def markdown_table(rows: list[dict], ours: str = "ours", peer: str = "TRL") -> str:
    """One line per size: tokens/s and memory of both sides and the ratios ours/peer.

    Each row: size, params, and `ours`/`peer` lists of worker results.
    """
    gpu = "cuda_peak_mib" in rows[0][ours][0]
    mem_key, mem_name = ("cuda_peak_mib", "peak GPU MiB") if gpu else ("train_rss_mib", "train RSS MiB")
    head = (f"| size | params | {ours} tok/s | {peer} tok/s | speed {ours}/{peer} | {ours} {mem_name} | "
            f"{peer} {mem_name} | memory {ours}/{peer} | {ours} peak RSS MiB | {peer} peak RSS MiB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        a, b = row[ours], row[peer]
        ta, tb = median_of(a, "tokens_per_s"), median_of(b, "tokens_per_s")
        ma, mb = median_of(a, mem_key), median_of(b, mem_key)
        lines.append(
            f"| {row['size']} | {row['params'] / 1e6:.2f}M | {ta:,.0f} ({spread(a, 'tokens_per_s')}) | "
            f"{tb:,.0f} ({spread(b, 'tokens_per_s')}) | **{ta / tb:.2f}** | {ma:.0f} | {mb:.0f} | "
            f"**{ma / mb:.2f}** | {median_of(a, 'peak_rss_mib'):.0f} | {median_of(b, 'peak_rss_mib'):.0f} |"
        )
    return "\n".join(lines)
