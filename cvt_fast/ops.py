"""The two fused ops of a CvT attention layer: their eager references, their torch custom ops, their dispatch.

Each reference is, at once, the CPU path, the fallback for whatever the kernel does not cover, and the oracle the
kernel tests compare against. The custom ops (`torch.ops.cvt_fast.*`) run the reference on CPU and the Triton
kernel on CUDA, so torch.compile and CUDA graphs see one opaque op instead of a graph break.

qkv_projection: three depthwise kxk convs + BatchNorm over the same (B, [1 +] H*W, C) tokens (q with stride_q,
                k and v with stride_kv), back in token layout with the cls row (never convolved) in front.
attention:      softmax(q k^T * scale) v per head, heads read by stride from (B, N, C), output in (B, Nq, C).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .dispatch import FP32_ATTENTION_VAR, ONEDNN_LINEAR, choose_kernel, fp32_attention_mode, linear_path


class ConvBN(NamedTuple):
    """One depthwise conv + BatchNorm (eval statistics) projection."""

    weight: torch.Tensor  # (C, 1, k, k) depthwise conv weight, no bias
    bn_weight: torch.Tensor  # (C,) gamma
    bn_bias: torch.Tensor  # (C,) beta
    running_mean: torch.Tensor  # (C,)
    running_var: torch.Tensor  # (C,)
    eps: float
    stride: int
    padding: int


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ---- eager references ---------------------------------------------------------------------------------------

# Derived weights (BatchNorm folded into the conv, below; the kernels' fold on the GPU) are computed on every call,
# never cached. A cache keyed on PyTorch's version counters goes stale under edits that the mainstream tools make
# every day: peft's LoRA merge writes through `.data`, and a BatchNorm in training mode updates its running
# statistics in place without bumping their version (fine-tuning with a frozen backbone, then evaluating). A fold is
# a handful of ops on (C,) vectors, a few percent of a batch-1 forward at most; a stale one is a wrong answer.


def clear_fold_cache() -> None:
    """Kept for code written against earlier releases: nothing derived from the weights is cached any more, so
    there is nothing to clear (edits of any kind, `.data` included, reach the next forward)."""


def fold_conv_bn(p: ConvBN, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm folded into the depthwise conv: (C, 1, k, k) weight and (C,) bias, in `dtype`.

    Folding happens in float32 (float64 for float64 weights) whatever `dtype` is, so half-precision models lose
    nothing to it.
    """
    compute = torch.promote_types(p.weight.dtype, torch.float32)
    scale = p.bn_weight.to(compute) * torch.rsqrt(p.running_var.to(compute) + p.eps)  # (C,)
    shift = torch.addcmul(p.bn_bias.to(compute), p.running_mean.to(compute), scale, value=-1.0)
    return (p.weight.to(compute) * scale.view(-1, 1, 1, 1)).to(dtype), shift.to(dtype)


def split_cls(x: torch.Tensor, with_cls: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(B, [1 +] N, C) -> cls (B, 1, C) or None, tokens (B, N, C); both views."""
    return (x[:, :1], x[:, 1:]) if with_cls else (None, x)


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a view: channels-last memory, which the convolutions read directly."""
    grid = tokens.transpose(1, 2).unflatten(2, (height, width))
    batch, channels = grid.shape[:2]
    if batch == 1 and tokens.stride(1) == channels and tokens.stride(2) == 1:
        # With one image the batch stride is free, and the view leaves a value that PyTorch does not recognise as
        # channels-last: the CPU conv would then copy to NCHW and take its slow path (4x slower at 28x28x192).
        grid = grid.as_strided(grid.shape, (height * width * channels, 1, width * channels, channels))
    return grid


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view when the grid is in channels-last memory."""
    return grid.flatten(2).transpose(1, 2)


def qkv_projection_reference(
    x: torch.Tensor, height: int, width: int, with_cls: bool, q: ConvBN, k: ConvBN, v: ConvBN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, [1 +] H*W, C) -> q (B, [1 +] Hq*Wq, C), k and v (B, [1 +] Hk*Wk, C); BatchNorm on running stats."""
    cls, tokens = split_cls(x, with_cls)
    # One copy here, when the cls row makes the tokens non-contiguous, instead of one inside each of the 3 convs.
    grid = tokens_to_grid(tokens, height, width).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
    outputs = []
    for p in (q, k, v):
        weight, bias = fold_conv_bn(p, x.dtype)
        y = F.conv2d(grid, weight, bias, stride=p.stride, padding=p.padding, groups=grid.shape[1])
        y = grid_to_tokens(y)  # (B, N', C)
        outputs.append(torch.cat((cls, y), dim=1) if cls is not None else y)
    return tuple(outputs)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, head_dim) as a view."""
    return t.unflatten(2, (num_heads, t.shape[2] // num_heads)).transpose(1, 2)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C). `scale` is CvT's embed_dim ** -0.5, not head_dim ** -0.5.

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


# ---- linear layers on the CPU ----------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, paths: dict | None = None) -> torch.Tensor:
    """F.linear, or, for CPU inference (float32, and bfloat16 where the CPU has it natively), oneDNN's matrix
    product, which outruns PyTorch's CPU GEMM on CvT's shapes (bench/results/NOTES.md). oneDNN reads the weight as it
    is: a prepacked copy would be slightly faster, but it is a cache that edits through `.data` (peft's merge) leave
    stale. `paths`, when given, records which path ran (see dispatch.linear_path)."""
    path = linear_path(x, weight)
    if paths is not None and not torch.compiler.is_compiling():
        paths["linear"] = path
    if path != ONEDNN_LINEAR:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# ---- torch custom ops: reference on CPU, Triton on CUDA -----------------------------------------------------


@torch.library.custom_op("cvt_fast::qkv_projection", mutates_args=())
def _qkv_projection_op(
    x: torch.Tensor,
    height: int,
    width: int,
    with_cls: bool,
    weights: list[torch.Tensor],  # [q, k, v] (C, 1, k, k)
    bn_params: list[torch.Tensor],  # [gamma, beta, mean, var] for q, then k, then v: 12 tensors of (C,)
    eps: list[float],  # [q, k, v]
    stride_q: int,
    padding_q: int,
    stride_kv: int,
    padding_kv: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = unflatten_conv_bn(weights, bn_params, eps, stride_q, padding_q, stride_kv, padding_kv)
    return tuple(t.contiguous() for t in qkv_projection_reference(x, height, width, with_cls, q, k, v))


@_qkv_projection_op.register_kernel("cuda")
def _qkv_projection_cuda(
    x, height, width, with_cls, weights, bn_params, eps, stride_q, padding_q, stride_kv, padding_kv
):
    from .kernels.conv_projection import qkv_conv_bn

    return qkv_conv_bn(x, height, width, with_cls, weights, bn_params, eps, stride_q, padding_q, stride_kv, padding_kv)


@_qkv_projection_op.register_fake
def _qkv_projection_fake(
    x, height, width, with_cls, weights, bn_params, eps, stride_q, padding_q, stride_kv, padding_kv
):
    kernel = weights[0].shape[-1]
    extra = 1 if with_cls else 0
    nq = conv_output_size(height, kernel, stride_q, padding_q) * conv_output_size(width, kernel, stride_q, padding_q)
    nk = conv_output_size(height, kernel, stride_kv, padding_kv) * conv_output_size(
        width, kernel, stride_kv, padding_kv
    )
    batch, _, channels = x.shape
    return (
        x.new_empty(batch, extra + nq, channels),
        x.new_empty(batch, extra + nk, channels),
        x.new_empty(batch, extra + nk, channels),
    )


def flatten_conv_bn(q: ConvBN, k: ConvBN, v: ConvBN):
    weights = [q.weight, k.weight, v.weight]
    bn_params = [t for p in (q, k, v) for t in (p.bn_weight, p.bn_bias, p.running_mean, p.running_var)]
    return weights, bn_params, [q.eps, k.eps, v.eps], q.stride, q.padding, k.stride, k.padding


def unflatten_conv_bn(weights, bn_params, eps, stride_q, padding_q, stride_kv, padding_kv):
    strides = ((stride_q, padding_q), (stride_kv, padding_kv), (stride_kv, padding_kv))
    return tuple(
        ConvBN(weights[i], *bn_params[4 * i : 4 * i + 4], eps[i], *strides[i])
        for i in range(3)  # noqa: E203
    )


@torch.library.custom_op("cvt_fast::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    return attention_reference(q, k, v, num_heads, scale).contiguous()


@_attention_op.register_kernel("cuda")
def _attention_cuda(q, k, v, num_heads, scale):
    if q.dtype == torch.float32 and fp32_attention_mode() == "sdpa":
        return attention_reference(q, k, v, num_heads, scale).contiguous()
    from .kernels.attention import flash_attention

    return flash_attention(q, k, v, num_heads, scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, num_heads, scale):
    return q.new_empty(q.shape)


# ---- dispatching entry points used by the model --------------------------------------------------------------

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
    module_path: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    backend: str,
    paths: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for one attention layer: the kernel, the eager reference, or `module_path` (the projection modules
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
            return module_path()
        return qkv_projection_reference(x, height, width, with_cls, *params)
    flat = flatten_conv_bn(*params)
    if x.is_cuda:
        return torch.ops.cvt_fast.qkv_projection(x, height, width, with_cls, *flat)
    from .kernels.conv_projection import qkv_conv_bn  # CPU tensors under the Triton interpreter

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
    from .kernels.attention import flash_attention  # CPU tensors under the Triton interpreter

    return flash_attention(q, k, v, num_heads, scale)


def _record(paths: dict | None, op: str, reason: str | None) -> None:
    if paths is not None and not torch.compiler.is_compiling():
        paths[op] = "triton" if reason is None else f"eager: {reason}"


__all__ = [
    "ConvBN",
    "linear",
    "attention",
    "attention_reference",
    "fold_conv_bn",
    "qkv_projection",
    "qkv_projection_reference",
]
