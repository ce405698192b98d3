"""The eager references of the two fused ops. Each is, at once, the CPU path, the fallback for whatever a kernel does
not cover, and the oracle the kernel tests compare against.

qkv_projection_reference: three depthwise kxk convs + BatchNorm (running statistics) over the same
                          (B, [1 +] H*W, C) tokens, back in token layout with the cls row (never convolved) in front.
attention_reference:      softmax(q k^T * scale) v per head, heads read by stride from (B, N, C).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .layout import grid_to_tokens, split_cls, split_heads, tokens_to_grid


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


# Derived weights (BatchNorm folded into the conv, below; the kernels' own fold on the GPU) are computed on every
# call, never cached. A cache keyed on PyTorch's version counters goes stale under edits that mainstream tools make
# every day: peft's LoRA merge writes through `.data`, and a BatchNorm in training mode updates its running
# statistics in place without bumping their version (a frozen backbone fine-tuned, then evaluated). A fold is a
# handful of ops on (C,) vectors; a stale one is a wrong answer.


def fold_conv_bn(p: ConvBN, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm folded into the depthwise conv: (C, 1, k, k) weight and (C,) bias, in `dtype`.

    Folding happens in float32 (float64 for float64 weights) whatever `dtype` is, so half-precision models lose
    nothing to it.
    """
    compute = torch.promote_types(p.weight.dtype, torch.float32)
    scale = p.bn_weight.to(compute) * torch.rsqrt(p.running_var.to(compute) + p.eps)  # (C,)
    shift = torch.addcmul(p.bn_bias.to(compute), p.running_mean.to(compute), scale, value=-1.0)
    return (p.weight.to(compute) * scale.view(-1, 1, 1, 1)).to(dtype), shift.to(dtype)


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
