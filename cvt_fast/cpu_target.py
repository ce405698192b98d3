"""What native code compiled for this CPU depends on, and whether code compiled for one CPU can run on another.

A frozen package (cvt_fast.frozen) holds machine code: inductor's C++ kernels, vectorised for the instruction sets
PyTorch allows here, and oneDNN's weights, packed for the matrix units oneDNN found. Run where those instructions are
missing, it dies of an illegal instruction or computes NaNs. So a package records the CPU target it was built for,
and a loader compares it with the CPU it is on before any of that code runs.

The target is what the compilers saw, not only what the silicon has: ATEN_CPU_CAPABILITY=avx2 makes PyTorch (and
inductor) generate AVX2 code on an AVX-512 CPU, and ONEDNN_MAX_CPU_ISA caps oneDNN alike.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The CPU flags compiled code may use (Linux /proc/cpuinfo names): vector widths, the bfloat16 / float16 / int8
# dot-product instructions and the AMX tiles. Others (aes, sha, ...) never appear in CvT's code.
RELEVANT_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
)  # fmt: skip
# PyTorch's kernel capabilities, weakest first (torch.backends.cpu.get_cpu_capability()).
CAPABILITIES = ("NO AVX", "DEFAULT", "AVX2", "AVX512")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The relevant flags of this CPU (empty where /proc/cpuinfo cannot be read: not Linux)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()
    return frozenset(flag for flag in RELEVANT_FLAGS if flag in words)


@functools.cache
def cpu_model_name() -> str:
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class CpuTarget:
    """The CPU a package was compiled for, as the compilers saw it."""

    machine: str  # platform.machine(): x86_64, aarch64, ...
    capability: str  # torch.backends.cpu.get_cpu_capability(): the widest vectors PyTorch and inductor generate
    flags: tuple[str, ...]  # RELEVANT_FLAGS this CPU has
    onednn_native_bfloat16: bool  # oneDNN computes bfloat16 natively (AMX or AVX-512 BF16), not capped away
    model_name: str  # for messages only: two CPUs of one class run each other's packages

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CpuTarget:
        return cls(
            machine=str(data["machine"]),
            capability=str(data["capability"]),
            flags=tuple(data["flags"]),
            onednn_native_bfloat16=bool(data["onednn_native_bfloat16"]),
            model_name=str(data.get("model_name", "?")),
        )

    def describe(self) -> str:
        bfloat16 = "native bfloat16" if self.onednn_native_bfloat16 else "no native bfloat16"
        amx = ", AMX" if "amx_tile" in self.flags else ""
        return f"{self.model_name} ({self.machine}, {self.capability}{amx}, {bfloat16})"


def this_cpu() -> CpuTarget:
    """The target code compiled in this process is built for (read now: the environment can cap it)."""
    from .ops.cpu_linear import cpu_has_native_bfloat16

    return CpuTarget(
        machine=platform.machine(),
        capability=torch.backends.cpu.get_cpu_capability(),
        flags=tuple(sorted(cpu_flags())),
        onednn_native_bfloat16=cpu_has_native_bfloat16(),
        model_name=cpu_model_name(),
    )


def cannot_run(built_for: CpuTarget, here: CpuTarget) -> str | None:
    """Why code built for `built_for` cannot run `here`, or None when it can: the same machine type, at least the
    capability it was compiled for, every flag it may use, and native bfloat16 if it had it (oneDNN packed its weights
    for those units)."""
    if built_for.machine != here.machine:
        return f"it was compiled for {built_for.machine}, this machine is {here.machine}"
    if _rank(here.capability) < _rank(built_for.capability):
        return (
            f"it was compiled for {built_for.capability} vectors and this process runs {here.capability} "
            "(the CPU, or ATEN_CPU_CAPABILITY, allows no more)"
        )
    missing = sorted(set(built_for.flags) - set(here.flags))
    if missing:
        return f"it may use {', '.join(missing)}, which this CPU lacks"
    if built_for.onednn_native_bfloat16 and not here.onednn_native_bfloat16:
        return "its weights were packed for native bfloat16 units, which oneDNN does not use here (ONEDNN_MAX_CPU_ISA?)"
    return None


def _rank(capability: str) -> int:
    return CAPABILITIES.index(capability) if capability in CAPABILITIES else 0
