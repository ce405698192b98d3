"""The two fused ops as the model calls them: each call asks dispatch.choose_kernel for the kernel or the reason not
to, records the path taken (kernel_paths()), and runs the Triton kernel (through its custom op on CUDA) or the eager
reference. What a kernel does not cover (a projection method, a head size, training) runs eagerly under any backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from . import custom_ops  # noqa: F401  (registers torch.ops.cvt_fast.*)
from .custom_ops import flatten_conv_bn
from .dispatch import FP32_ATTENTION_VAR, choose_kernel, fp32_attention_mode
from .references import ConvBN, attention_reference, qkv_projection_reference

# While exporting (cvt_fast.export), the eager path's attention is traced as the one op torch.ops.cvt_fast.attention
# (whose CPU implementation is attention_reference) instead of SDPA on per-head views, so that the exporter can map
# it whole onto the runtime's fused attention.
# (A plain module flag, not a ContextVar: torch.compile traces the eager path and reads globals, not ContextVars.)
_attention_as_one_op = False


@contextlib.contextmanager
def attention_as_one_op() -> Iterator[None]:
    global _attention_as_one_op
    before, _attention_as_one_op = _attention_as_one_op, True
    try:
        yield
    finally:
        _attention_as_one_op = before


MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 128
# The float32 (tf32x3) attention kernel spills registers beyond it on sm_90 (tests/test_kernels_compile.py).
FP32_MAX_HEAD_DIM = 64


def qkv_projection(
    x: torch.Tensor,
    height: int,
    width: int,
    with_cls: bool,
    params: Sequence[ConvBN] | None,
    *,
    projection_method: str,
    training: bool,
    run_modules: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    backend: str,
    paths: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for one attention layer: the kernel, the eager reference, or `run_modules` (the projection modules
    one by one), which serves training (BatchNorm on batch statistics) and the projections the op does not fuse.
    `params` is None unless the projection method is "dw_bn"."""
    unsupported = None
    if params is None:
        unsupported = f"qkv_projection_method {projection_method!r} (only 'dw_bn' is fused)"
    elif (params[1].stride, params[1].padding) != (params[2].stride, params[2].padding):
        unsupported = "keys and values with different strides or paddings"
    tensors = [x] if params is None else [x, *(t for p in params for t in p[:5])]
    reason = choose_kernel("qkv_projection", backend, tensors, training=training, unsupported=unsupported)
    _record(paths, "qkv_projection", reason)
    if reason is not None:
        if training or params is None:
            return run_modules()
        return qkv_projection_reference(x, height, width, with_cls, *params)
    flat = flatten_conv_bn(*params)
    if x.is_cuda:
        return torch.ops.cvt_fast.qkv_projection(x, height, width, with_cls, *flat)
    from ..kernels.conv_projection import qkv_conv_bn  # CPU tensors under the Triton interpreter

    return qkv_conv_bn(x, height, width, with_cls, *flat)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    scale: float,
    *,
    dropout_p: float,
    training: bool,
    backend: str,
    paths: dict | None = None,
) -> torch.Tensor:
    head_dim = q.shape[-1] // num_heads
    unsupported = None
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        unsupported = f"head_dim {head_dim} is outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    elif q.dtype == torch.float32 and fp32_attention_mode() == "sdpa":
        unsupported = f"float32 attention is given to scaled_dot_product_attention ({FP32_ATTENTION_VAR}=sdpa)"
    elif q.dtype == torch.float32 and head_dim > FP32_MAX_HEAD_DIM:
        unsupported = f"float32 with head_dim {head_dim} > {FP32_MAX_HEAD_DIM}: the kernel would spill registers"
    reason = choose_kernel("attention", backend, [q, k, v], training=training, unsupported=unsupported)
    _record(paths, "attention", reason)
    if reason is not None:
        if _attention_as_one_op and not (training and dropout_p > 0.0):
            return torch.ops.cvt_fast.attention(q, k, v, num_heads, scale)  # the same reference, as one op
        return attention_reference(q, k, v, num_heads, scale, dropout_p if training else 0.0)
    if q.is_cuda:
        return torch.ops.cvt_fast.attention(q, k, v, num_heads, scale)
    from ..kernels.attention import flash_attention  # CPU tensors under the Triton interpreter

    return flash_attention(q, k, v, num_heads, scale)


def _record(paths: dict | None, op: str, reason: str | None) -> None:
    if paths is not None and not torch.compiler.is_compiling():
        paths[op] = "triton" if reason is None else f"eager: {reason}"
