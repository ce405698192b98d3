"""CvT's attention: softmax(q k^T * scale) v per head, with keys and values shorter than the queries (strided
projections), the cls token among them, and CvT's scale embed_dim ** -0.5 (not head_dim ** -0.5). In one place, in
the order a call meets them:

  attention            what the model calls: the layer's KernelRoute picks the flash kernel or the reference
  torch.ops.cvt_fast.attention
                       the custom op (reference on the CPU, Triton kernel on CUDA), one opaque node for
                       torch.compile, CUDA graphs and torch.export (and, while exporting, ONNX's fused attention)
  attention_reference  the CPU path, the fallback, and the oracle the kernel tests compare against
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .dispatch import FP32_ATTENTION_VAR, KernelRoute, fp32_attention_mode
from .layout import split_heads

MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 128
# The float32 (tf32x3) attention kernel spills registers beyond it on sm_90 (tests/test_kernels_compile.py).
FP32_MAX_HEAD_DIM = 64


def kernel_refuses(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the flash kernel does not take heads of this size in this dtype, or None."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim {head_dim} is outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if dtype == torch.float32 and head_dim > FP32_MAX_HEAD_DIM:
        return f"float32 with head_dim {head_dim} > {FP32_MAX_HEAD_DIM}: the kernel would spill registers"
    return None


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C).

    With dropout the probabilities are materialised and dropped exactly as transformers does (same random
    stream, so a seeded training step matches it); without, scaled_dot_product_attention never materialises them.
    """
    qh, kh, vh = (split_heads(t, num_heads) for t in (q, k, v))
    if dropout_p > 0.0:
        probs = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
        out = torch.matmul(F.dropout(probs, dropout_p, training=True), vh)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return out.transpose(1, 2).flatten(2)  # (B, Nq, C); SDPA's output is already laid out this way


# ---- the custom op ------------------------------------------------------------------------------------------


@torch.library.custom_op("cvt_fast::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    return attention_reference(q, k, v, num_heads, scale).contiguous()


@_attention_op.register_kernel("cuda")
def _attention_cuda(q, k, v, num_heads, scale):
    # The route sends the heads the kernel does not cover to the reference; the op itself reaches CUDA with them
    # only when a model is exported whole (attention_as_one_op), where what the exporter records is the op, not this
    # body. (Float32 under CVT_FAST_FP32_ATTENTION=sdpa runs the kernel here: as accurate, tf32x3.)
    if kernel_refuses(q.shape[-1] // num_heads, q.dtype) is not None:
        return attention_reference(q, k, v, num_heads, scale).contiguous()
    from ..kernels.attention import flash_attention

    return flash_attention(q, k, v, num_heads, scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, num_heads, scale):
    return q.new_empty(q.shape)


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


# ---- what the model calls -----------------------------------------------------------------------------------


def attention_route(backend: str, embed_dim: int, num_heads: int) -> KernelRoute:
    """The route of one layer's attention. CVT_FAST_FP32_ATTENTION is read here, once."""
    sdpa_for_float32 = backend != "eager" and fp32_attention_mode() == "sdpa"
    return KernelRoute("attention", backend, functools.partial(_uncovered, embed_dim // num_heads, sdpa_for_float32))


def _uncovered(head_dim: int, sdpa_for_float32: bool, dtype: torch.dtype) -> str | None:
    if dtype == torch.float32 and sdpa_for_float32 and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"float32 attention is given to scaled_dot_product_attention ({FP32_ATTENTION_VAR}=sdpa)"
    return kernel_refuses(head_dim, dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float, route: KernelRoute,
    training: bool = False, dropout_p: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C): the flash kernel or the reference; dropout in training."""
    reason = route.reason((q, k, v), training)
    if reason is not None:
        if _attention_as_one_op and not (training and dropout_p > 0.0):
            return torch.ops.cvt_fast.attention(q, k, v, num_heads, scale)  # the same reference, as one op
        return attention_reference(q, k, v, num_heads, scale, dropout_p if training else 0.0)
    if q.is_cuda:
        return torch.ops.cvt_fast.attention(q, k, v, num_heads, scale)
    from ..kernels.attention import flash_attention  # CPU tensors under the Triton interpreter

    return flash_attention(q, k, v, num_heads, scale)
