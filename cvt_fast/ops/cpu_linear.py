"""Linear layers on the CPU: oneDNN's matrix product for inference where this CPU and oneDNN support it, F.linear
everywhere else, with the reason. No copy of the weight is kept (see linear)."""

from __future__ import annotations

import functools
import os
import platform

import torch
import torch.nn.functional as F

from .dispatch import log_once

ONEDNN_LINEAR_VAR = "CVT_FAST_ONEDNN_LINEAR"  # "0" keeps linear layers on F.linear on the CPU too
ONEDNN_LINEAR = "onednn"  # the path name kernel_paths() shows for linear layers on oneDNN


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU (AVX-512 BF16, AMX, or AVX-NE-CONVERT): its bfloat16
    product refuses to run anywhere else. Asks oneDNN itself, so ONEDNN_MAX_CPU_ISA=AVX2 makes it answer False, and
    PyTorch's own capability (ATEN_CPU_CAPABILITY=avx2 too)."""
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "AVX512":
        # PyTorch packs bfloat16 weights for oneDNN with AVX-512 code of its own (pack_vnni2): under a capped
        # ATEN_CPU_CAPABILITY that refuses to run, whatever oneDNN itself supports.
        return False
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without the query: assume the worst
        return False


class LinearRoute:
    """How one linear layer runs: "onednn" (oneDNN's matrix product, for CPU inference in float32, and in bfloat16
    where the CPU has it natively), "F.linear" off the CPU, or "F.linear: <why not oneDNN>" on the CPU.

    Never while autograd records (training) or torch.compile / torch.export traces (they bring their own GEMMs),
    nor under CPU autocast (which casts F.linear's operands and knows nothing of oneDNN's op). What cannot change
    between calls (CVT_FAST_ONEDNN_LINEAR, oneDNN in this PyTorch) is read when the layer is built (and again by
    the model's set_backend); the verdict on a dtype is kept after its first call. `taken`: the last call's path.
    """

    def __init__(self):
        self.refused: str | None = None
        if os.environ.get(ONEDNN_LINEAR_VAR, "1") == "0":
            self.refused = f"{ONEDNN_LINEAR_VAR}=0"
        elif not torch.backends.mkldnn.is_available():
            self.refused = "this PyTorch has no oneDNN"
        self._by_dtype: dict[tuple[torch.dtype, torch.dtype, bool], str] = {}
        self.taken: str | None = None

    def __getstate__(self) -> dict:
        # The verdicts judged this CPU (native bfloat16 or not); a model unpickled on another judges its own.
        return {**self.__dict__, "_by_dtype": {}, "taken": None}

    def path(self, x: torch.Tensor, weight: torch.Tensor) -> str:
        if x.device.type != "cpu":
            path = "F.linear"
        elif torch.compiler.is_compiling():
            return "F.linear: traced by a compiler"
        elif torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            path = "F.linear: autograd is recording"
        elif torch.is_autocast_enabled("cpu"):
            path = "F.linear: CPU autocast casts F.linear's operands"
        else:
            key = (x.dtype, weight.dtype, weight.numel() == 0)
            path = self._by_dtype.get(key) or self._by_dtype.setdefault(key, self._decide(*key))
        self.taken = path
        return path

    def _decide(self, dtype: torch.dtype, weight_dtype: torch.dtype, empty: bool) -> str:
        if self.refused is not None:
            reason = self.refused
        elif dtype != weight_dtype or dtype not in (torch.float32, torch.bfloat16):
            reason = f"dtype {dtype}: oneDNN's linear serves float32 and bfloat16"
        elif empty:
            reason = "an empty weight (oneDNN has no zero-width product)"
        elif dtype == torch.bfloat16 and not cpu_has_native_bfloat16():
            reason = "bfloat16 on a CPU without native bfloat16 (oneDNN needs AVX-512 BF16, AMX or AVX-NE-CONVERT)"
        else:
            return ONEDNN_LINEAR
        log_once(f"linear layers run on F.linear: {reason}")
        return f"F.linear: {reason}"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, route: LinearRoute) -> torch.Tensor:
    """F.linear, or, for CPU inference (float32, and bfloat16 where the CPU has it natively), oneDNN's matrix
    product, which outruns PyTorch's CPU GEMM on CvT's shapes (bench/cpu_linear.py). oneDNN reads the weight as it
    is: a prepacked copy would be faster still, but it is a cache that edits through `.data` (peft's merge) leave
    stale."""
    if route.path(x, weight) != ONEDNN_LINEAR:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
