"""The fused q/k/v projection of a CvT attention layer: three depthwise kxk convs, each followed by BatchNorm on its
running statistics, over the same (B, [1 +] H*W, C) tokens, back in token layout with the cls row (never convolved)
in front. In one place, in the order a call meets them:

  qkv_projection            what the model calls: the layer's KernelRoute picks the kernel or the reference
  torch.ops.cvt_fast.qkv_projection
                            the custom op (reference on the CPU, Triton kernel on CUDA), one opaque node for
                            torch.compile, CUDA graphs and torch.export instead of a graph break
  qkv_projection_reference  the CPU path, the fallback, and the oracle the kernel tests compare against

The op, its reference and its kernel (cvt_fast.kernels.conv_projection.qkv_conv_bn) take the same flat arguments,
QkvOperands, because a custom op takes tensors, lists of tensors and scalars, not a tuple of per-projection tuples.
ConvBN and qkv_operands build them from one tuple per projection, for tests and benchmarks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..kernels.shapes import conv_output_size
from .dispatch import KernelRoute
from .layout import grid_to_tokens, split_cls, tokens_to_grid


class QkvOperands(NamedTuple):
    """Everything but the tokens that the projection reads: the three depthwise convs' weights, their BatchNorms'
    parameters and statistics, eps, and the strides and paddings (keys and values share theirs)."""

    weights: list[torch.Tensor]  # [q, k, v], each (C, 1, k, k), no bias
    bn_params: list[torch.Tensor]  # [gamma, beta, running_mean, running_var] for q, then k, then v: 12 of (C,)
    eps: list[float]  # [q, k, v]
    stride_q: int
    padding_q: int
    stride_kv: int
    padding_kv: int


class ConvBN(NamedTuple):
    """One depthwise conv + BatchNorm (eval statistics) projection, as tests and benchmarks build it."""

    weight: torch.Tensor  # (C, 1, k, k) depthwise conv weight, no bias
    bn_weight: torch.Tensor  # (C,) gamma
    bn_bias: torch.Tensor  # (C,) beta
    running_mean: torch.Tensor  # (C,)
    running_var: torch.Tensor  # (C,)
    eps: float
    stride: int
    padding: int


def qkv_operands(q: ConvBN, k: ConvBN, v: ConvBN) -> QkvOperands:
    if (k.stride, k.padding) != (v.stride, v.padding):
        raise ValueError("keys and values share one stride and padding in the fused projection")
    bn_params = [t for p in (q, k, v) for t in (p.bn_weight, p.bn_bias, p.running_mean, p.running_var)]
    return QkvOperands([q.weight, k.weight, v.weight], bn_params, [q.eps, k.eps, v.eps], q.stride, q.padding,
                       k.stride, k.padding)  # fmt: skip


# ---- the reference ------------------------------------------------------------------------------------------

# Derived weights (BatchNorm folded into the conv, below; the kernels' own fold on the GPU) are computed on every
# call, never cached. A cache keyed on PyTorch's version counters goes stale under edits that mainstream tools make
# every day: peft's LoRA merge writes through `.data`, and a BatchNorm in training mode updates its running
# statistics in place without bumping their version (a frozen backbone fine-tuned, then evaluated). A fold is a
# handful of ops on (C,) vectors; a stale one is a wrong answer.


def fold_conv_bn(p: ConvBN, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm folded into the depthwise conv: (C, 1, k, k) weight and (C,) bias, in `dtype`."""
    return _fold(p.weight, p.bn_weight, p.bn_bias, p.running_mean, p.running_var, p.eps, dtype)


def _fold(weight, gamma, beta, mean, var, eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # In float32 (float64 for float64 weights) whatever `dtype` is, so half-precision models lose nothing to it.
    compute = torch.promote_types(weight.dtype, torch.float32)
    scale = gamma.to(compute) * torch.rsqrt(var.to(compute) + eps)  # (C,)
    shift = torch.addcmul(beta.to(compute), mean.to(compute), scale, value=-1.0)
    return (weight.to(compute) * scale.view(-1, 1, 1, 1)).to(dtype), shift.to(dtype)


def qkv_projection_reference(
    x: torch.Tensor, height: int, width: int, with_cls: bool, weights: list[torch.Tensor],
    bn_params: list[torch.Tensor], eps: list[float], stride_q: int, padding_q: int, stride_kv: int, padding_kv: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """x (B, [1 +] H*W, C) -> q (B, [1 +] Hq*Wq, C), k and v (B, [1 +] Hk*Wk, C); the rest as in QkvOperands."""
    cls, tokens = split_cls(x, with_cls)
    # One copy here, when the cls row makes the tokens non-contiguous, instead of one inside each of the 3 convs.
    grid = tokens_to_grid(tokens, height, width).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
    outputs = []
    for i, (stride, padding) in enumerate(((stride_q, padding_q), (stride_kv, padding_kv), (stride_kv, padding_kv))):
        weight, bias = _fold(weights[i], *bn_params[4 * i : 4 * i + 4], eps[i], x.dtype)  # noqa: E203
        y = grid_to_tokens(F.conv2d(grid, weight, bias, stride=stride, padding=padding, groups=grid.shape[1]))
        outputs.append(torch.cat((cls, y), dim=1) if cls is not None else y)
    return tuple(outputs)


# ---- the custom op ------------------------------------------------------------------------------------------


@torch.library.custom_op("cvt_fast::qkv_projection", mutates_args=())
def _qkv_projection_op(
    x: torch.Tensor,
    height: int,
    width: int,
    with_cls: bool,
    weights: list[torch.Tensor],
    bn_params: list[torch.Tensor],
    eps: list[float],
    stride_q: int,
    padding_q: int,
    stride_kv: int,
    padding_kv: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outputs = qkv_projection_reference(
        x, height, width, with_cls, weights, bn_params, eps, stride_q, padding_q, stride_kv, padding_kv
    )
    return tuple(t.contiguous() for t in outputs)


@_qkv_projection_op.register_kernel("cuda")
def _qkv_projection_cuda(x, height, width, with_cls, *operands):
    from ..kernels.conv_projection import qkv_conv_bn

    return qkv_conv_bn(x, height, width, with_cls, *operands)


@_qkv_projection_op.register_fake
def _qkv_projection_fake(x, height, width, with_cls, weights, bn_params, eps, stride_q, padding_q, stride_kv,
                         padding_kv):  # fmt: skip
    kernel = weights[0].shape[-1]

    def tokens(stride, padding):
        size = conv_output_size(height, kernel, stride, padding) * conv_output_size(width, kernel, stride, padding)
        return size + (1 if with_cls else 0)

    batch, _, channels = x.shape
    nq, nk = tokens(stride_q, padding_q), tokens(stride_kv, padding_kv)
    return x.new_empty(batch, nq, channels), x.new_empty(batch, nk, channels), x.new_empty(batch, nk, channels)


# ---- what the model calls -----------------------------------------------------------------------------------


def qkv_projection_route(backend: str, projection_method: str) -> KernelRoute:
    """The route of one layer's projection: the kernel fuses "dw_bn" only."""
    if projection_method == "dw_bn":
        return KernelRoute("qkv_projection", backend)
    return KernelRoute("qkv_projection", backend, functools.partial(_unfused, projection_method))


def _unfused(projection_method: str, dtype: torch.dtype) -> str:
    return f"qkv_projection_method {projection_method!r} (only 'dw_bn' is fused)"


def qkv_projection(
    x: torch.Tensor, height: int, width: int, with_cls: bool, operands: QkvOperands | None, route: KernelRoute,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """q, k, v for one attention layer: the kernel or the eager reference; None where the layer's own modules must
    run them (training, whose BatchNorm uses batch statistics, and the projection methods the op does not fuse:
    the layer passes no `operands` for either)."""
    tensors = [x] if operands is None else [x, *operands.weights, *operands.bn_params]
    reason = route.reason(tensors, training)
    if reason is not None:
        if training or operands is None:
            return None
        return qkv_projection_reference(x, height, width, with_cls, *operands)
    if x.is_cuda:
        return torch.ops.cvt_fast.qkv_projection(x, height, width, with_cls, *operands)
    from ..kernels.conv_projection import qkv_conv_bn  # CPU tensors under the Triton interpreter

    return qkv_conv_bn(x, height, width, with_cls, *operands)
