"""The two fused ops as torch custom ops (torch.ops.cvt_fast.qkv_projection and .attention): the eager reference
on the CPU, the Triton kernel on CUDA, so that torch.compile, CUDA graphs and torch.export see one opaque op instead
of a graph break. The tensors of the three ConvBN projections travel flattened (custom ops take tensors and lists)."""

from __future__ import annotations

import torch

from ..kernels.shapes import conv_output_size
from .dispatch import fp32_attention_mode
from .references import ConvBN, attention_reference, qkv_projection_reference


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
    from ..kernels.conv_projection import qkv_conv_bn

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
    from ..kernels.attention import flash_attention

    return flash_attention(q, k, v, num_heads, scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, num_heads, scale):
    return q.new_empty(q.shape)
