"""The single decision point: for each fused-op call, a Triton kernel or the eager reference.

Backends:
  "eager"   never run a kernel.
  "auto"    run a kernel where one applies (CUDA tensors, eval mode, float32/float16/bfloat16, a covered shape);
            otherwise the eager path, and log the reason once.
  "triton"  run the kernels, also on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1). Where they
            cannot run at all (no Triton, another device, float64) it raises instead of falling back. What an op
            does not cover (a projection method, a head size) and training or autograd (the kernels have no
            backward) still take the eager path, as under "auto".

The backend comes from the constructor / from_pretrained argument, else the CVT_FAST_BACKEND variable, else "auto".

float32 attention on the kernel path (CVT_FAST_FP32_ATTENTION): "tf32x3" (the default: the kernel, with three TF32
tensor-core products per dot for float32-level accuracy) or "sdpa" (PyTorch's scaled_dot_product_attention, which
also computes float32 attention on tensor cores). The GPU sweep (bench/kernel_bench.py) measures both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ..errors import InputError, KernelUnavailableError
from ..kernels.launch import TRITON_INTERPRET

BACKENDS = ("auto", "eager", "triton")
ENV_VAR = "CVT_FAST_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_ATTENTION_VAR = "CVT_FAST_FP32_ATTENTION"
FP32_ATTENTION_MODES = ("tf32x3", "sdpa")

logger = logging.getLogger("cvt_fast")
_logged_reasons: set[str] = set()
_kernel_import_error: list[str | None] = []  # [] until checked, then [None] or [reason]


def resolve_backend(backend: str | None = None) -> str:
    chosen = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    chosen = chosen.strip().lower()
    if chosen not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
        raise InputError(f"{source} is {chosen!r}; expected one of {BACKENDS}")
    return chosen


def fp32_attention_mode() -> str:
    """How float32 attention runs on the kernel path (read on every call, so a test or a sweep can switch it)."""
    mode = os.environ.get(FP32_ATTENTION_VAR, "tf32x3").strip().lower()
    if mode not in FP32_ATTENTION_MODES:
        raise InputError(
            f"environment variable {FP32_ATTENTION_VAR} is {mode!r}; expected one of {FP32_ATTENTION_MODES}"
        )
    return mode


def prepare_backend(backend: str) -> None:
    """Import the kernels now, where they may run, rather than on a first forward inside a torch.compile trace."""
    if backend != "eager" and (torch.cuda.is_available() or TRITON_INTERPRET):
        kernels_import_error()


def kernels_import_error() -> str | None:
    """None when the kernels (and so Triton) import, else why they do not."""
    if not _kernel_import_error:
        try:
            from ..kernels import attention, conv_projection  # noqa: F401  (the launchers import Triton)

            _kernel_import_error.append(None)
        except ImportError as error:  # triton missing, or an install without the kernels package
            _kernel_import_error.append(f"the Triton kernels are unavailable ({error})")
    return _kernel_import_error[0]


def _environment_reason(tensors: Sequence[torch.Tensor], backend: str) -> str | None:
    """Why the kernels cannot run on these tensors at all, or None."""
    device, dtype = tensors[0].device, tensors[0].dtype
    if device.type == "cpu":
        if not TRITON_INTERPRET and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return (
                "CPU tensors: TRITON_INTERPRET=1 was set after cvt_fast was imported; it must be set before "
                "importing cvt_fast (and triton) for the kernels to run in the interpreter"
            )
        if not TRITON_INTERPRET:
            return "CPU tensors: the kernels run on CUDA (or on CPU under TRITON_INTERPRET=1 with backend='triton')"
        if backend == "auto":
            return "CPU tensors: 'auto' runs kernels on CUDA only; backend='triton' runs them in the Triton interpreter"
    elif device.type != "cuda":
        return f"{device.type} tensors: the kernels run on CUDA"
    import_error = kernels_import_error()
    if import_error:
        return import_error
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype}: the kernels take float32, float16 and bfloat16"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 on CPU: the Triton interpreter has no bfloat16 arithmetic"
    return None


def choose_kernel(
    op: str,
    backend: str,
    tensors: Sequence[torch.Tensor],
    *,
    training: bool = False,
    unsupported: str | None = None,
) -> str | None:
    """Return None to run the kernel for `op`, or the reason the eager path runs instead.

    `unsupported` is the op's own reason for not covering this call (a shape or projection method), if any.
    """
    if backend == "eager":
        return "backend='eager'"
    if training:
        return _fall_back(op, "training mode: the kernels have no backward and BatchNorm uses batch statistics")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _fall_back(
            op, "autograd is recording (no backward in the kernels); run inference under torch.inference_mode()"
        )
    reason = _environment_reason(tensors, backend)
    if reason is not None and backend == "triton":
        raise KernelUnavailableError(
            f"backend='triton' cannot run {op}: {reason}. Use backend='auto' (--backend auto) to fall back."
        )
    reason = reason or unsupported  # what the op does not cover runs eagerly under either backend
    if reason is None:
        return None
    return _fall_back(op, reason, surprising=tensors[0].is_cuda)


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log a fallback's reason the first time it happens, not on every call."""
    if message not in _logged_reasons and not torch.compiler.is_compiling():
        _logged_reasons.add(message)
        logger.log(level, "cvt_fast: %s", message)


def _fall_back(op: str, reason: str, surprising: bool = False) -> str:
    # On CUDA a fallback costs speed the user came for, so it is a warning; elsewhere it is expected.
    log_once(f"{op} runs eagerly: {reason}", logging.WARNING if surprising else logging.INFO)
    return reason
