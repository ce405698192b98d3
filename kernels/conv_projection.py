"""Fused q/k/v projection of a CvT attention layer: three depthwise KxK convolutions + BatchNorm in one pass.

Fuses, for x in token layout (B, [1 +] H*W, C):
  q = BN_q(dwconv_q(x, stride_q, padding_q)),  k = BN_k(dwconv_k(x, stride_kv, padding_kv)),  v likewise,
each written straight back in token layout, with the cls row (row 0, never convolved) copied in front: no
permute, no torch.cat. BatchNorm uses running statistics, folded inside the kernel on every call (scale =
gamma / sqrt(var + eps), shift = beta - mean * scale), so weights edited after loading are honoured.

One program owns a block of channels and a block of positions of the q grid *and* the matching block of the
(smaller) k/v grid: both read the same neighbourhood of x, so the taps k and v need are still in L1/L2 when they
are loaded. k and v share every loaded tap. Accumulation is float32 whatever the input dtype.

Not covered (the eager path serves them): BatchNorm on batch statistics (training), autograd, keys and values
with different strides or paddings, the "avg" and "linear" projection methods.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import TRITON_INTERPRET
from ..ops import conv_output_size


@triton.jit
def _output_positions(pid_p, BLOCK: tl.constexpr, out_h, out_w):
    """This program's block of positions in an out_h x out_w output grid: (pos, in-grid mask, row, column)."""
    pos = pid_p * BLOCK + tl.arange(0, BLOCK)
    return pos, pos < out_h * out_w, pos // out_w, pos % out_w


@triton.jit
def _load_tap(x_base, ih, iw, H, W, stride_xt, p_mask, channels, c_mask):
    """x at pixel (ih, iw) of each position's window, as float32 (positions, BLOCK_C); zero outside the image,
    which is the convolution's zero padding."""
    inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offsets = (ih * W + iw)[:, None] * stride_xt + channels[None, :]
    return tl.load(x_base + offsets, mask=inside[:, None] & c_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_weight(w_ptr, channels, c_mask, tap, TAPS: tl.constexpr):
    """One tap of a (C, 1, K, K) depthwise weight, for a block of channels, as float32."""
    return tl.load(w_ptr + channels * TAPS + tap, mask=c_mask, other=0.0).to(tl.float32)


@triton.jit
def _store_batchnorm(out_ptr, acc, rows, channels, mask, C, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, c_mask):
    """BatchNorm from the running statistics (scale = gamma / sqrt(var + eps), shift = beta - mean * scale), applied
    to the float32 conv sums and stored in the output's dtype."""
    gamma = tl.load(gamma_ptr + channels, mask=c_mask, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + channels, mask=c_mask, other=1.0).to(tl.float32)
    scale = gamma / tl.sqrt(var + eps)
    out = acc * scale[None, :] + (beta - mean * scale)[None, :]
    tl.store(out_ptr + rows[:, None] * C + channels[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_conv_bn_kernel(
    x_ptr,  # (B, T, C) input tokens, T = WITH_CLS + H * W; channel stride 1
    q_ptr,  # (B, WITH_CLS + Hq * Wq, C) output, contiguous
    k_ptr,  # (B, WITH_CLS + Hk * Wk, C) output, contiguous
    v_ptr,  # (B, WITH_CLS + Hk * Wk, C) output, contiguous
    wq_ptr,  # (C, 1, KSIZE, KSIZE) depthwise weights of q, contiguous
    wk_ptr,  # (C, 1, KSIZE, KSIZE) of k
    wv_ptr,  # (C, 1, KSIZE, KSIZE) of v
    q_gamma, q_beta, q_mean, q_var,  # (C,) BatchNorm of q: weight, bias, running mean, running variance
    k_gamma, k_beta, k_mean, k_var,  # (C,) of k
    v_gamma, v_beta, v_mean, v_var,  # (C,) of v
    q_eps, k_eps, v_eps,
    stride_xb, stride_xt,  # x strides in elements for batch and token
    C, H, W, Hq, Wq, Hk, Wk,
    KSIZE: tl.constexpr,
    STRIDE_Q: tl.constexpr, PAD_Q: tl.constexpr,
    STRIDE_KV: tl.constexpr, PAD_KV: tl.constexpr,
    WITH_CLS: tl.constexpr,  # 1 when row 0 is a cls token, else 0
    BLOCK_Q: tl.constexpr,  # q-grid positions per program
    BLOCK_KV: tl.constexpr,  # k/v-grid positions per program (about BLOCK_Q * Nkv / Nq: the same region of x)
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    x_base = x_ptr + b * stride_xb + WITH_CLS * stride_xt  # first grid token of this image
    TAPS: tl.constexpr = KSIZE * KSIZE

    if WITH_CLS:  # the cls row is carried over unchanged, once per (image, channel block)
        if pid_p == 0:
            cls = tl.load(x_ptr + b * stride_xb + channels, mask=c_mask)
            tl.store(q_ptr + b * (1 + Hq * Wq) * C + channels, cls, mask=c_mask)
            tl.store(k_ptr + b * (1 + Hk * Wk) * C + channels, cls, mask=c_mask)
            tl.store(v_ptr + b * (1 + Hk * Wk) * C + channels, cls, mask=c_mask)

    # ---- q: stride_q over the full grid ----
    pos, p_mask, oh, ow = _output_positions(pid_p, BLOCK_Q, Hq, Wq)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for di in tl.static_range(KSIZE):
        for dj in tl.static_range(KSIZE):
            tap = _load_tap(x_base, oh * STRIDE_Q - PAD_Q + di, ow * STRIDE_Q - PAD_Q + dj, H, W, stride_xt,
                            p_mask, channels, c_mask)  # fmt: skip
            acc += tap * _load_weight(wq_ptr, channels, c_mask, di * KSIZE + dj, TAPS)[None, :]
    rows = b * (WITH_CLS + Hq * Wq) + WITH_CLS + pos
    mask = p_mask[:, None] & c_mask[None, :]
    _store_batchnorm(q_ptr, acc, rows, channels, mask, C, q_gamma, q_beta, q_mean, q_var, q_eps, c_mask)

    # ---- k and v: stride_kv, sharing every tap they load ----
    pos, p_mask, oh, ow = _output_positions(pid_p, BLOCK_KV, Hk, Wk)
    acc_k = tl.zeros((BLOCK_KV, BLOCK_C), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_KV, BLOCK_C), dtype=tl.float32)
    for di in tl.static_range(KSIZE):
        for dj in tl.static_range(KSIZE):
            tap = _load_tap(x_base, oh * STRIDE_KV - PAD_KV + di, ow * STRIDE_KV - PAD_KV + dj, H, W, stride_xt,
                            p_mask, channels, c_mask)  # fmt: skip
            acc_k += tap * _load_weight(wk_ptr, channels, c_mask, di * KSIZE + dj, TAPS)[None, :]
            acc_v += tap * _load_weight(wv_ptr, channels, c_mask, di * KSIZE + dj, TAPS)[None, :]
    rows = b * (WITH_CLS + Hk * Wk) + WITH_CLS + pos
    mask = p_mask[:, None] & c_mask[None, :]
    _store_batchnorm(k_ptr, acc_k, rows, channels, mask, C, k_gamma, k_beta, k_mean, k_var, k_eps, c_mask)
    _store_batchnorm(v_ptr, acc_v, rows, channels, mask, C, v_gamma, v_beta, v_mean, v_var, v_eps, c_mask)


def block_sizes(
    n_q: int,
    n_kv: int,
    channels: int,
    ksize: int,
    blocks: tuple[int, int] | None = None,
    interpreter: bool = TRITON_INTERPRET,
) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_KV, BLOCK_C, num_warps). BLOCK_KV covers about the same region of x as BLOCK_Q does.
    On the GPU: 64 channels (a 128-byte line in half precision) by 32 positions (16 from 5x5 kernels up, whose
    taps take more registers), 4 warps: no register spill on sm_90 (ptxas resource usage, checked by
    tests/test_kernels_compile.py). Their speed is not yet measured on Hopper."""
    if blocks is not None:
        (block_q, block_c), num_warps = blocks, 1 if interpreter else 4
    elif interpreter:
        # The interpreter pays per operation, not per element: few, large programs are what makes it fast.
        block_q, block_c, num_warps = (
            min(256, triton.next_power_of_2(n_q)),
            min(64, triton.next_power_of_2(channels)),
            1,
        )
    else:
        block_q, block_c, num_warps = 32 if ksize <= 3 else 16, min(64, triton.next_power_of_2(channels)), 4
    block_kv = triton.next_power_of_2(max(1, -(-block_q * n_kv // max(n_q, 1))))
    return block_q, block_kv, block_c, num_warps


def qkv_conv_bn(
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
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, [1 +] H*W, C) -> q (B, [1 +] Hq*Wq, C), k and v (B, [1 +] Hk*Wk, C), in x's dtype.

    weights: [q, k, v] depthwise conv weights (C, 1, K, K); bn_params: [gamma, beta, mean, var] of q, then k, then v.
    out: optional contiguous (q, k, v) to write into (preallocated buffers; the tests pass NaN-filled ones).
    blocks: optional (BLOCK_Q, BLOCK_C) powers of two, for tests of block edges and for tuning sweeps.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, tokens, channels), got shape {tuple(x.shape)}")
    batch, tokens, channels = x.shape
    extra = int(with_cls)
    if tokens != extra + height * width:
        raise ValueError(f"x has {tokens} tokens; expected {extra} + {height}x{width} = {extra + height * width}")
    ksize = weights[0].shape[-1]
    for w in weights:
        if tuple(w.shape) != (channels, 1, ksize, ksize):
            raise ValueError(f"depthwise weights must be ({channels}, 1, {ksize}, {ksize}), got {tuple(w.shape)}")
    if len(bn_params) != 12 or any(p.shape != (channels,) for p in bn_params):
        raise ValueError(f"bn_params must be 12 tensors of shape ({channels},)")
    if batch > 65535:  # the batch is the grid's z axis
        raise ValueError(f"batches of at most 65535 images, got {batch}; split the batch")
    if x.stride(2) != 1:
        x = x.contiguous()
    weights = [w.contiguous() for w in weights]
    bn_params = [p.contiguous() for p in bn_params]

    hq, wq = conv_output_size(height, ksize, stride_q, padding_q), conv_output_size(width, ksize, stride_q, padding_q)
    hk, wk = (
        conv_output_size(height, ksize, stride_kv, padding_kv),
        conv_output_size(width, ksize, stride_kv, padding_kv),
    )
    if min(hq, wq, hk, wk) < 1:
        raise ValueError(f"a {height}x{width} grid is too small for kernel {ksize} with these strides and paddings")
    shapes = (
        (batch, extra + hq * wq, channels),
        (batch, extra + hk * wk, channels),
        (batch, extra + hk * wk, channels),
    )
    if out is None:
        q, k, v = (torch.empty(shape, device=x.device, dtype=x.dtype) for shape in shapes)
    else:
        for t, shape in zip(out, shapes, strict=True):
            if tuple(t.shape) != shape or t.dtype != x.dtype or not t.is_contiguous():
                raise ValueError(f"out tensors must be contiguous {x.dtype} of shapes {shapes}")
        q, k, v = out

    block_q, block_kv, block_c, num_warps = block_sizes(hq * wq, hk * wk, channels, ksize, blocks)
    grid = (max(triton.cdiv(hq * wq, block_q), triton.cdiv(hk * wk, block_kv)), triton.cdiv(channels, block_c), batch)
    _qkv_conv_bn_kernel[grid](
        x, q, k, v, *weights, *bn_params, *(float(e) for e in eps),
        x.stride(0), x.stride(1),
        channels, height, width, hq, wq, hk, wk,
        KSIZE=ksize, STRIDE_Q=stride_q, PAD_Q=padding_q, STRIDE_KV=stride_kv, PAD_KV=padding_kv,
        WITH_CLS=extra, BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_C=block_c,
        num_warps=num_warps,
    )  # fmt: skip
    return q, k, v
