"""Precision by hardware: `trainer.precision: auto` picks what this machine computes fast.

bf16 is only a speed-up where the processor multiplies bf16 natively. On a CPU with AVX512-bf16 or AMX a bf16
matmul runs about 1.7x faster than fp32; on an AVX2-only CPU (many laptops and cloud VMs) PyTorch emulates it
and the same matmul runs about 38x slower. So `auto` resolves to:

- CUDA: `bf16-mixed` where the GPU supports bf16 (Ampere and later), else `16-mixed` (fp16 with a loss scaler);
- CPU: `bf16-mixed` where the CPU has native bf16 (the `avx512_bf16` or `amx_bf16` flag), else `32-true`;
- anything else (Apple MPS, ...): `32-true`.

The choice is logged once at start; a bf16 precision forced on a CPU without native bf16 is warned about.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux `/proc/cpuinfo`), or an empty set where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-bf16 or AMX); Apple silicon and AVX2-only x86 do
    not (PyTorch emulates bf16 there)."""
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in BF16_CPU_FLAGS)
    return False if platform.system() == "Darwin" else _onednn_bf16()


def _onednn_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_cuda(accelerator) -> bool:
    """Whether a Trainer with this `accelerator` runs on CUDA."""
    import torch

    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    return torch.cuda.is_available() and any(k in str(name).lower() for k in ("auto", "gpu", "cuda"))


def uses_cpu(accelerator) -> bool:
    import torch

    name = str(accelerator if isinstance(accelerator, str) else type(accelerator).__name__).lower()
    return "cpu" in name or (name == "auto" and not torch.cuda.is_available()
                             and not (torch.backends.mps.is_available() if hasattr(torch.backends, "mps") else False))


def resolve_precision(precision, accelerator="auto") -> tuple[object, str]:
    """(the precision to give Lightning, why): `auto` becomes this machine's fast one; anything else is kept."""
    import torch

    if precision != "auto":
        return precision, "as configured"
    if uses_cuda(accelerator):
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"CUDA ({torch.cuda.get_device_name(0)}) supports bf16"
        return "16-mixed", f"CUDA ({torch.cuda.get_device_name(0)}) has no bf16: fp16 with a loss scaler"
    if uses_cpu(accelerator):
        capability = torch.backends.cpu.get_cpu_capability()
        if cpu_has_native_bf16():
            return "bf16-mixed", f"the CPU has native bf16 (AVX512-bf16/AMX; ATen kernels {capability})"
        return "32-true", (f"the CPU has no native bf16 (ATen kernels {capability}; no avx512_bf16/amx_bf16): "
                           "bf16 would be emulated, ~38x slower than fp32")
    return "32-true", f"accelerator {accelerator!r}: fp32"


def warn_if_slow_bf16(precision, accelerator) -> str | None:
    """The warning for bf16 forced on a CPU that emulates it (None where there is nothing to say)."""
    if str(precision) in BF16_PRECISIONS and uses_cpu(accelerator) and not cpu_has_native_bf16():
        return (f"precision {precision!r} on a CPU without native bf16 (no avx512_bf16/amx_bf16 flag): bf16 is "
                "emulated there and runs ~38x slower than fp32; use `trainer.precision: auto` (fp32 here) or "
                "32-true")
    return None
