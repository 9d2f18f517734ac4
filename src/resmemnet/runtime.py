"""The one device and precision policy: the inference core's scorers (predict, evaluate, explain, serve) and training.

`auto` follows what the hardware computes natively, read from the CPU's flags rather than from a
library switch: oneDNN reports bf16 "supported" on any AVX-512 CPU, but without AVX512-BF16 or AMX
it emulates bf16, and an emulated bf16 run is about twice as slow as fp32 (measured on a 2-core
Xeon with AVX-512 VNNI and no bf16). So a CPU gets bf16 only with `avx512_bf16` or `amx_bf16`, a
GPU gets fp16, and everything else fp32. `PrecisionChoice.reason` says which rule applied, so
`resmemnet info` can tell a user why.

int8 comes first on a CPU with 8-bit dot-product instructions (`avx512_vnni`, `avx_vnni`, `amx_int8`),
but only where an int8 model exists (an ONNX file from `resmemnet export --int8`): int8 is a
different model file, run by ONNX Runtime, not an autocast dtype.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["INT8_FLAGS", "PRECISIONS", "PrecisionChoice", "autocast", "choose_precision", "cpu_flags", "resolve_device"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 8-bit dot products, which ONNX Runtime's int8 kernels use
MAKE_INT8 = ("`resmemnet export --format onnx --int8 --calibrate PHOTOS/ --output model.int8.onnx`, then pass "
             "`--backend onnxruntime --onnx model.int8.onnx`")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_device(device: str | torch.device = "auto", *, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when present, else CPU; a bare 'cuda' under torchrun -> this rank's GPU."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"Unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses, and the rule that picked it."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32."""
        return _DTYPES[self.name]


def choose_precision(requested: str = "auto", device: torch.device | str = "cpu", *,
                     int8: bool = False) -> PrecisionChoice:
    """`auto` -> int8 on a VNNI/AMX CPU when `int8` (an int8 model exists), fp16 on a GPU, bf16 on a CPU that
    computes it natively, else fp32; a requested precision is checked against the device and the model."""
    if requested not in PRECISIONS:
        raise ValueError(f"Unknown precision {requested!r}; available: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ValueError("fp16 autocast is for GPUs; on a CPU use --precision bf16 or fp32")
        if requested == "int8" and not int8:
            raise ValueError(f"--precision int8 needs an int8 model; make one with {MAKE_INT8}")
        return PrecisionChoice(requested, "requested")
    if device.type == "cuda":
        return PrecisionChoice("fp16", "GPU: fp16 autocast")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"{device.type}: fp32")
    vnni = sorted(set(INT8_FLAGS) & cpu_flags())
    if int8 and vnni:
        return PrecisionChoice("int8", f"CPU has 8-bit dot products ({', '.join(vnni)}) and the model has an "
                                       "int8 ONNX file")
    native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
    unused = f"; int8 model unused: no {'/'.join(INT8_FLAGS)} flag" if int8 else ""
    if native:
        return PrecisionChoice("bf16", f"CPU computes bf16 natively ({', '.join(native)}){unused}")
    return PrecisionChoice("fp32", f"CPU ({platform.machine()}) has no native bf16 (no avx512_bf16/amx_bf16 flag): "
                                   f"bf16 would be emulated and slower than fp32{unused}")


def autocast(device: torch.device, precision: PrecisionChoice) -> contextlib.AbstractContextManager:
    """torch.autocast for `precision`, or a no-op for fp32."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)
