"""Shared plumbing for the benchmarks against TRL (bench/sft.py; later bench/rm.py and bench/ppo.py).

Every measurement runs in a fresh spawned process, so the two frameworks never share an allocator, a CUDA
context or a memory high-water mark. Inside it a `StepMeter` counts the non-pad tokens the decoder receives
(a forward pre-hook, the same on both sides) and stamps the end of every optimizer step (a Lightning or a
transformers callback calls `step_end`); a `MemoryMeter` measures what training adds on top of the loaded
model and data. `compare` alternates the sides (ours, TRL, TRL, ours, ...) so that drift on a shared machine
falls on both, and the tables report medians.
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
# 25.2M parameters with the tiny 1024-token vocabulary: 8 blocks of 3.02M plus a 0.52M embedding and head.
# Full multi-head attention (kv heads = heads), as in the LLaMA-1 7B that Alpaca fine-tuned.
LLAMA_25M = dict(hidden_size=512, intermediate_size=1280, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8)
# The real SmolLM2-135M-Instruct (GGUF, ../shared/models; its README): 30 blocks, hidden 576, 9 heads / 3 KV
# heads, intermediate 1536, vocabulary 49,152, tied embeddings. Dequantized once into an ordinary Hugging Face
# folder in the gguf cache (alpaca_rlhf.models.gguf_folder); real weights and real tokenizer on both sides.
SMOL_GGUF = Path(os.environ.get("ALPACA_RLHF_SMOL_GGUF",
                                ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
SIZES = ("tiny", "25M", "smol")
QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "transformers", "trl", "datasets", "peft", "alpaca_rlhf")


def quiet() -> None:
    """Silences library chatter; call it again after importing Lightning, which sets its own log levels."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def lightning_trainer(tmp: str, callbacks: list, precision: str | None = None, **limits):
    """Our side's Trainer: one device, no logger, checkpoints, progress bar, summary or validation.
    `limits`: max_steps, or max_epochs + limit_train_batches. Precision: bf16-mixed on a GPU, fp32 on the CPU."""
    import lightning as L
    import torch

    gpu = torch.cuda.is_available()
    return L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1,
                     precision=precision or ("bf16-mixed" if gpu else "32-true"), logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, default_root_dir=tmp,
                     **limits)


def trl_lora_config(lora: dict, task_type: str):
    """TRL's side of the same LoRA (`peft.LoraConfig` from our LoraSpec fields)."""
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), bias=lora.get("bias", "none"),
                      task_type=task_type)


def tiny_config() -> dict:
    """What both sides take from configs/tiny/sft.yaml: the tiny model, LoRA, learning rate, batch, length."""
    import yaml

    cfg = yaml.safe_load(TINY_SFT_CONFIG.read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    return {
        "tiny": dict(model["model"]["tiny"]),
        "lora": {k: v for k, v in model["lora"].items() if k != "modules_to_save"},
        "lr": float(model["optimizer"]["init_args"]["lr"]),
        "batch_size": int(data["batch_size"]),
        "max_length": int(data["cutoff_len"]),
        "seed": int(cfg.get("seed_everything", 42)),
    }


def build_bases(sizes: list[str], root: str | os.PathLike) -> dict[str, dict]:
    """The model folder of each named size: `tiny` and `25M` are random-weight LLaMAs with the locally trained
    1024-token tokenizer, built under `root`; `smol` is the real SmolLM2-135M-Instruct (see SMOL_GGUF).

    Returns:
        {size: {"path": folder, "params": parameter count}}.
    """
    import json

    from alpaca_rlhf.models import TINY_LLAMA, build_tiny_base

    configs = {"tiny": tiny_config()["tiny"], "25M": LLAMA_25M}
    bases = {}
    for size in sizes:
        if size == "smol":
            bases[size] = smol_base()
            continue
        if size not in configs:
            raise ValueError(f"unknown size {size!r}; choose from {list(SIZES)}")
        path = Path(root, size)
        if not (path / "config.json").is_file():
            build_tiny_base(path, configs[size])
        cfg = {**TINY_LLAMA, **json.loads((path / "config.json").read_text())}
        bases[size] = {"path": str(path), "params": llama_params(cfg)}
    return bases


def smol_base() -> dict:
    """{"path", "params"} of the converted SmolLM2 folder; a clear error when the shared file is absent."""
    import json

    from alpaca_rlhf.models import ModelSpec, gguf_folder

    if not SMOL_GGUF.is_file():
        raise SystemExit(f"size smol needs the real SmolLM2 GGUF at {SMOL_GGUF} (../shared/models; or set "
                         "ALPACA_RLHF_SMOL_GGUF); it is absent")
    path = gguf_folder(ModelSpec(name_or_path=str(SMOL_GGUF)), str(SMOL_GGUF))
    return {"path": str(path), "params": llama_params(json.loads((path / "config.json").read_text()))}


def llama_params(cfg: dict) -> int:
    """Parameter count of a LLaMA config (embeddings, blocks, final norm, untied head)."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    embed = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    return n * block + embed + h


class StepMeter:
    """Tokens, wall time and process CPU time per optimizer step.

    `attach(model)` hooks the decoder stack (LlamaModel) of a plain or PEFT-wrapped causal LM: each forward
    adds its non-pad input tokens (`attention_mask.sum()`; all of `input_ids` without a mask). The training
    loop's callback calls `step_end()` once per optimizer step, after the optimizer has stepped. CPU time
    (all threads of the process) is a companion figure that other programs on a shared machine disturb less.
    """

    def __init__(self) -> None:
        self._pending = []  # token counts, as tensors: no device sync until step_end
        self.step_tokens: list[int] = []
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []

    def attach(self, model) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.get_decoder().register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and mask.dim() == 2:
            self._pending.append(mask.sum())
        else:
            self._pending.append(kwargs.get("input_ids", args[0] if args else None).numel())

    def step_end(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())
        self.step_tokens.append(int(sum(int(t) for t in self._pending)))
        self._pending = []

    def window(self, warmup: int, steps: int) -> dict:
        """Throughput over steps warmup+1 .. warmup+steps, timed from the end of step `warmup` (>= 1)."""
        if len(self.step_ends) < warmup + steps:
            raise RuntimeError(f"{len(self.step_ends)} steps ran; wanted {warmup} warm-up + {steps} timed")
        ends = self.step_ends[warmup - 1:warmup + steps]
        seconds = ends[-1] - ends[0]
        cpu_seconds = self.step_cpu[warmup + steps - 1] - self.step_cpu[warmup - 1]
        tokens = sum(self.step_tokens[warmup:warmup + steps])
        steps_s = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "tokens_per_cpu_s": tokens / cpu_seconds, "step_s_median": statistics.median(steps_s),
                "steps_s": steps_s, "tokens_per_step": self.step_tokens[warmup:warmup + steps]}


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


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> None:
    """Hands freed heap pages back to the OS (glibc): RSS at the baseline is then what is live."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def track_live_memory(threshold: int = 256 * 1024) -> bool:
    """Makes RSS follow live memory: glibc mmaps every block of `threshold` bytes or more, unmapped on free.

    By default glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), so activations end up
    on the heap and freed ones stay resident until reused. RSS then records the allocator's history more than
    what training needs: on the 25M model about twice the live peak, and 10% apart for two frameworks doing
    the same work. With a fixed threshold RSS tracks live memory, at the price of a page fault per fresh page
    (training about 60% slower on CPU), so `compare` uses it only in a separate, untimed memory run.
    """
    libc = _libc()
    m_mmap_threshold = -3  # from malloc.h
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(m_mmap_threshold, threshold))


class MemoryMeter:
    """Peak memory of what runs between `start()` and `stop()`.

    CPU, Linux: `start()` returns freed heap pages to the OS, records the current RSS and resets the
    high-water mark (`echo 5 > /proc/self/clear_refs`); `stop()` reads the mark (`VmHWM`) again.
    `train_rss_mib` is the peak during training minus the RSS before it: activations, gradients, optimizer
    state and framework buffers on top of the loaded model and data. `peak_rss_mib` is the process's peak RSS
    over its life. Elsewhere both fall back to `getrusage(RUSAGE_SELF).ru_maxrss` (the delta is then a
    lower bound, and the peak may include the parent's, which Linux hands on across fork and exec).
    GPU: `cuda_peak_mib` is `torch.cuda.max_memory_allocated()` over the whole process (the two frameworks
    move the model to the device at different moments, so a delta would not compare like with like).
    """

    def start(self) -> None:
        import gc

        gc.collect()
        _malloc_trim()
        self.peak_before_kb = _status_kb("VmHWM") or _maxrss_kb()
        self.baseline_kb = _status_kb("VmRSS")
        self.reset = False
        if self.baseline_kb is not None:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset = True
            except OSError:
                pass
        if not self.reset:
            self.baseline_kb = _maxrss_kb()

    def stop(self) -> dict:
        import torch

        peak_kb = _status_kb("VmHWM") if self.reset else _maxrss_kb()
        out = {
            "train_rss_mib": max(0, peak_kb - self.baseline_kb) / 1024,
            "baseline_rss_mib": self.baseline_kb / 1024,
            "peak_rss_mib": max(peak_kb, self.peak_before_kb) / 1024,
        }
        if torch.cuda.is_available():
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def _child(conn, fn: Callable, kwargs: dict, threads: int | None, live_memory: bool) -> None:
    try:
        live = track_live_memory() if live_memory else False  # before anything large is allocated
        quiet()
        if threads:
            import torch

            torch.set_num_threads(threads)
        conn.send(("ok", {**fn(**kwargs), "live_memory": live}))
    except BaseException:  # noqa: B036 - whatever it is, the parent reports it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn: Callable, timeout: float | None = None, threads: int | None = None,
                 live_memory: bool = False, **kwargs) -> dict:
    """Runs `fn(**kwargs)` in a fresh spawned Python process and returns its result dict (picklable).

    `fn` must be importable by module path: a top-level function of the calling script, or a
    `functools.partial` of one. `threads` sets torch's intra-op threads there (default: torch's choice);
    `live_memory` runs it under `track_live_memory()`.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, kwargs, threads, live_memory))
    proc.start()
    child.close()
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{name} gave no result within {timeout} s")
        status, payload = parent.recv()
    except EOFError:
        proc.join()
        status, payload = "error", f"the worker died (exit code {proc.exitcode})"
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"{name} failed in its worker process:\n{payload}")
    return payload


def compare(workers: dict[str, Callable], repeats: int, memory_run: bool = True,
            log: Callable[[str], None] = print, **kwargs) -> dict[str, dict]:
    """Times each worker `repeats` times, each run in its own process, alternating the order every round.
    Then, if `memory_run`, runs each once more under `track_live_memory()` for its CPU memory.

    Returns:
        {name: {"runs": [timed results], "memory": the memory run's result or None}}.
    """
    names = list(workers)
    results: dict[str, dict] = {name: {"runs": [], "memory": None} for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run_isolated(workers[name], **kwargs)
            results[name]["runs"].append(res)
            gpu = f", peak GPU {res['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in res else ""
            log(f"  run {r + 1}/{repeats} {name:>5}: {res['tokens_per_s']:8.0f} tok/s, "
                f"{res['tokens_per_cpu_s']:8.0f} tok/CPU-s, "
                f"median step {res['step_s_median'] * 1000:.0f} ms "
                f"(steps {', '.join(f'{t:.1f}' for t in res.get('steps_s', []))} s), "
                f"peak RSS {res['peak_rss_mib']:.0f} MiB{gpu}")
    for name in names if memory_run else []:
        res = run_isolated(workers[name], live_memory=True, **kwargs)
        results[name]["memory"] = res
        log(f"  memory run {name:>5}: training adds {res['train_rss_mib']:.0f} MiB to "
            f"{res['baseline_rss_mib']:.0f} MiB (fixed mmap threshold: {res['live_memory']})")
    return results


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def device_description(threads: int | None = None) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"CPU ({platform.machine()}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch "
            f"threads), torch {torch.__version__}")


def markdown_table(rows: list[dict], ours: str = "ours", peer: str = "TRL") -> str:
    """One line per size: throughput and memory of both sides, and the ratios ours/peer.

    Each row: `size`, `params`, and `ours`/`peer` entries as `compare` returns them. Higher speed ratios and
    lower memory ratios are better for us.
    """
    gpu = "cuda_peak_mib" in rows[0][ours]["runs"][0]
    if gpu:
        mem_head = f"{ours} peak GPU MiB | {peer} peak GPU MiB | memory {ours}/{peer}"
    else:
        mem_head = (f"{ours} train MiB | {peer} train MiB | memory {ours}/{peer} | "
                    f"{ours} peak RSS MiB | {peer} peak RSS MiB")
    head = (f"| size | params | {ours} tok/s | {peer} tok/s | speed {ours}/{peer} | "
            f"speed {ours}/{peer}, CPU time | {mem_head} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        a, b = row[ours]["runs"], row[peer]["runs"]
        ta, tb = median_of(a, "tokens_per_s"), median_of(b, "tokens_per_s")
        ca, cb = median_of(a, "tokens_per_cpu_s"), median_of(b, "tokens_per_cpu_s")
        cells = [row["size"], f"{row['params'] / 1e6:.1f}M", f"{ta:,.0f}", f"{tb:,.0f}", f"**{ta / tb:.2f}**",
                 f"{ca / cb:.2f}"]
        if gpu:
            ma, mb = median_of(a, "cuda_peak_mib"), median_of(b, "cuda_peak_mib")
            cells += [f"{ma:,.0f}", f"{mb:,.0f}", f"**{ma / mb:.2f}**"]
        else:
            ma, mb = (row[side]["memory"]["train_rss_mib"] if row[side]["memory"] else float("nan")
                      for side in (ours, peer))
            cells += [f"{ma:,.0f}", f"{mb:,.0f}", f"**{ma / mb:.2f}**",
                      f"{median_of(a, 'peak_rss_mib'):,.0f}", f"{median_of(b, 'peak_rss_mib'):,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
