"""Linear layers on the CPU: oneDNN's matrix product for inference where this CPU and oneDNN support it, F.linear
everywhere else, with the reason. No copy of the weight is kept (see linear)."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .dispatch import log_once

ONEDNN_LINEAR_VAR = "CVT_FAST_ONEDNN_LINEAR"  # "0" keeps linear layers on F.linear on the CPU too
ONEDNN_LINEAR = "onednn"  # the path name kernel_paths() shows for linear layers on oneDNN


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU (AVX-512 BF16, AMX, or AVX-NE-CONVERT): its bfloat16
    product refuses to run anywhere else. Asks oneDNN itself, so ONEDNN_MAX_CPU_ISA=AVX2 makes it answer False."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without the query: assume the worst
        return False


def linear_path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """How a linear layer runs: "onednn" (oneDNN's matrix product, for CPU inference in float32, and in bfloat16
    where the CPU has it natively), "F.linear" off the CPU, or "F.linear: <why not oneDNN>" on the CPU.

    Never while autograd records (training) or torch.compile / torch.export traces (they bring their own GEMMs),
    nor under CPU autocast (which casts F.linear's operands and knows nothing of oneDNN's op)."""
    if x.device.type != "cpu":
        return "F.linear"
    reason = None
    if os.environ.get(ONEDNN_LINEAR_VAR, "1") == "0":
        reason = f"{ONEDNN_LINEAR_VAR}=0"
    elif torch.compiler.is_compiling():
        return "F.linear: traced by a compiler"
    elif torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        reason = "autograd is recording"
    elif torch.is_autocast_enabled("cpu"):
        reason = "CPU autocast casts F.linear's operands"
    elif x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        reason = f"dtype {x.dtype}: oneDNN's linear serves float32 and bfloat16"
    elif weight.numel() == 0:
        reason = "an empty weight (oneDNN has no zero-width product)"
    elif not torch.backends.mkldnn.is_available():
        reason = "this PyTorch has no oneDNN"
    elif x.dtype == torch.bfloat16 and not cpu_has_native_bfloat16():
        reason = "bfloat16 on a CPU without native bfloat16 (oneDNN needs AVX-512 BF16, AMX or AVX-NE-CONVERT)"
    if reason is None:
        return ONEDNN_LINEAR
    log_once(f"linear layers run on F.linear: {reason}")
    return f"F.linear: {reason}"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, paths: dict | None = None) -> torch.Tensor:
    """F.linear, or, for CPU inference (float32, and bfloat16 where the CPU has it natively), oneDNN's matrix
    product, which outruns PyTorch's CPU GEMM on CvT's shapes (bench/cpu_linear.py). oneDNN reads the weight as it
    is: a prepacked copy would be faster still, but it is a cache that edits through `.data` (peft's merge) leave
    stale. `paths`, when given, records which path ran (see linear_path)."""
    path = linear_path(x, weight)
    if paths is not None and not torch.compiler.is_compiling():
        paths["linear"] = path
    if path != ONEDNN_LINEAR:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
