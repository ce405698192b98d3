"""Fused q/k/v projection of a CvT attention layer: three depthwise KxK convolutions + BatchNorm in one pass.

Fuses, for x in token layout (B, [1 +] H*W, C):
  q = BN_q(dwconv_q(x, stride_q, padding_q)),  k = BN_k(dwconv_k(x, stride_kv, padding_kv)),  v likewise,
each written straight back in token layout, with the cls row (row 0, never convolved) copied in front: no
permute, no torch.cat. BatchNorm (running statistics) is folded into the conv weights, in float32, by a small
kernel launched first on every call (never cached: a cached fold goes stale under edits that bypass PyTorch's
version counters, such as a BatchNorm's running statistics updated by a training forward). The conv kernel reads
that fold tap-major, (3, K*K, C), so the weights of one tap for a block of channels are contiguous: one vector
load, never a gather.

One program owns a block of channels and one or more blocks of positions of the q grid *and*, in the same
iteration, the matching block of the (smaller) k/v grid: both read the same neighbourhood of x, so the taps k and
v need are still in L1 when they are loaded. k and v share every loaded tap. Accumulation is float32 whatever the
input dtype; the folded weights come in the input's dtype (as the eager path's fold does), the shifts in float32.

Block sizes: `default_config` (a table), `candidate_configs` for tuning
sweeps, or an explicit `config=`.
Not covered (the eager path serves them): BatchNorm on batch statistics (training), autograd, keys and values
with different strides or paddings, the "avg" and "linear" projection methods.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import TRITON_INTERPRET, launch_guard
from .shapes import conv_output_size


@triton.jit
def _output_positions(block, BLOCK: tl.constexpr, out_h, out_w):
    """A block of positions in an out_h x out_w output grid: (pos, in-grid mask, row, column)."""
    pos = block * BLOCK + tl.arange(0, BLOCK)
    return pos, pos < out_h * out_w, pos // out_w, pos % out_w


@triton.jit
def _load_tap(x_base, ih, iw, H, W, stride_xt, p_mask, channels, c_mask):
    """x at pixel (ih, iw) of each position's window, as float32 (positions, BLOCK_C); zero outside the image,
    which is the convolution's zero padding."""
    inside = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offsets = (ih * W + iw)[:, None] * stride_xt + channels[None, :]
    return tl.load(x_base + offsets, mask=inside[:, None] & c_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_weight(w_ptr, projection: tl.constexpr, tap, TAPS: tl.constexpr, C, channels, c_mask):
    """One tap of one projection's folded weight, (BLOCK_C,) as float32: contiguous channels, a vector load."""
    return tl.load(w_ptr + (projection * TAPS + tap) * C + channels, mask=c_mask, other=0.0).to(tl.float32)


@triton.jit
def _store(out_ptr, acc, bias, rows, channels, mask, C):
    """The float32 conv sums plus the folded BatchNorm shift, stored in the output's dtype."""
    out = acc + bias[None, :]
    tl.store(out_ptr + rows[:, None] * C + channels[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_conv_bn_kernel(
    x_ptr,  # (B, T, C) input tokens, T = WITH_CLS + H * W; channel stride 1
    q_ptr,  # (B, WITH_CLS + Hq * Wq, C) output, contiguous
    k_ptr,  # (B, WITH_CLS + Hk * Wk, C) output, contiguous
    v_ptr,  # (B, WITH_CLS + Hk * Wk, C) output, contiguous
    w_ptr,  # (3, KSIZE * KSIZE, C) in x's dtype, contiguous: BatchNorm-folded depthwise weights of q, k, v, tap-major
    bias_ptr,  # (3, C) float32, contiguous: BatchNorm-folded shifts of q, k, v
    stride_xb, stride_xt,  # x strides in elements for batch and token
    C, H, W, Hq, Wq, Hk, Wk,
    blocks_per_program,  # position blocks each program walks through
    KSIZE: tl.constexpr,
    STRIDE_Q: tl.constexpr, PAD_Q: tl.constexpr,
    STRIDE_KV: tl.constexpr, PAD_KV: tl.constexpr,
    WITH_CLS: tl.constexpr,  # 1 when row 0 is a cls token, else 0
    BLOCK_Q: tl.constexpr,  # q-grid positions per block
    BLOCK_KV: tl.constexpr,  # k/v-grid positions per block (about BLOCK_Q * Nkv / Nq: the same region of x)
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    x_base = x_ptr + b * stride_xb + WITH_CLS * stride_xt  # first grid token of this image
    TAPS: tl.constexpr = KSIZE * KSIZE
    # 3x3 kernels unroll whole (their 27 weight vectors then stay in registers across the position loop); larger
    # ones keep one kernel row of taps live at a time, or they would spill.
    ROW_UNROLL: tl.constexpr = KSIZE if KSIZE <= 3 else 1
    q_rows0 = b * (WITH_CLS + Hq * Wq) + WITH_CLS  # output row of this image's first q position
    kv_rows0 = b * (WITH_CLS + Hk * Wk) + WITH_CLS

    if WITH_CLS:  # the cls row is carried over unchanged, once per (image, channel block)
        if pid_p == 0:
            cls = tl.load(x_ptr + b * stride_xb + channels, mask=c_mask)
            tl.store(q_ptr + (q_rows0 - 1) * C + channels, cls, mask=c_mask)
            tl.store(k_ptr + (kv_rows0 - 1) * C + channels, cls, mask=c_mask)
            tl.store(v_ptr + (kv_rows0 - 1) * C + channels, cls, mask=c_mask)

    bias_q = tl.load(bias_ptr + channels, mask=c_mask, other=0.0)
    bias_k = tl.load(bias_ptr + C + channels, mask=c_mask, other=0.0)
    bias_v = tl.load(bias_ptr + 2 * C + channels, mask=c_mask, other=0.0)
    for i in range(blocks_per_program):
        block = pid_p * blocks_per_program + i

        # ---- q: stride_q over the full grid ----
        pos, p_mask, oh, ow = _output_positions(block, BLOCK_Q, Hq, Wq)
        acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
        for di in tl.range(0, KSIZE, loop_unroll_factor=ROW_UNROLL):
            for dj in tl.static_range(KSIZE):
                tap = _load_tap(x_base, oh * STRIDE_Q - PAD_Q + di, ow * STRIDE_Q - PAD_Q + dj, H, W, stride_xt,
                                p_mask, channels, c_mask)  # fmt: skip
                acc += tap * _load_weight(w_ptr, 0, di * KSIZE + dj, TAPS, C, channels, c_mask)[None, :]
        _store(q_ptr, acc, bias_q, q_rows0 + pos, channels, p_mask[:, None] & c_mask[None, :], C)

        # ---- k and v: stride_kv, sharing every tap they load ----
        pos, p_mask, oh, ow = _output_positions(block, BLOCK_KV, Hk, Wk)
        acc_k = tl.zeros((BLOCK_KV, BLOCK_C), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_KV, BLOCK_C), dtype=tl.float32)
        for di in tl.range(0, KSIZE, loop_unroll_factor=ROW_UNROLL):
            for dj in tl.static_range(KSIZE):
                tap = _load_tap(x_base, oh * STRIDE_KV - PAD_KV + di, ow * STRIDE_KV - PAD_KV + dj, H, W, stride_xt,
                                p_mask, channels, c_mask)  # fmt: skip
                acc_k += tap * _load_weight(w_ptr, 1, di * KSIZE + dj, TAPS, C, channels, c_mask)[None, :]
                acc_v += tap * _load_weight(w_ptr, 2, di * KSIZE + dj, TAPS, C, channels, c_mask)[None, :]
        mask = p_mask[:, None] & c_mask[None, :]
        _store(k_ptr, acc_k, bias_k, kv_rows0 + pos, channels, mask, C)
        _store(v_ptr, acc_v, bias_v, kv_rows0 + pos, channels, mask, C)


@triton.jit
def _fold_one(
    w_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps, folded_w_ptr, shift_ptr, C, channels, c_mask,
    TAPS: tl.constexpr, TAPS_P2: tl.constexpr,
):  # fmt: skip
    """One projection: scale = gamma / sqrt(var + eps), shift = beta - mean * scale, weight * scale stored
    tap-major. Everything in float32; the weight is stored in the folded tensor's dtype."""
    gamma = tl.load(gamma_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + channels, mask=c_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + channels, mask=c_mask, other=1.0).to(tl.float32)
    scale = gamma * tl.rsqrt(var + eps)
    tl.store(shift_ptr + channels, beta - mean * scale, mask=c_mask)
    taps = tl.arange(0, TAPS_P2)
    mask = c_mask[:, None] & (taps < TAPS)[None, :]
    weight = tl.load(w_ptr + channels[:, None] * TAPS + taps[None, :], mask=mask, other=0.0).to(tl.float32)
    folded = (weight * scale[:, None]).to(folded_w_ptr.dtype.element_ty)
    tl.store(folded_w_ptr + taps[None, :] * C + channels[:, None], folded, mask=mask)


@triton.jit
def _fold_batchnorm_kernel(
    wq_ptr, wk_ptr, wv_ptr,  # (C, 1, K, K) contiguous depthwise weights of q, k, v
    gamma_q, beta_q, mean_q, var_q,  # (C,) each: q's BatchNorm weight, bias, running mean and variance
    gamma_k, beta_k, mean_k, var_k,  # k's
    gamma_v, beta_v, mean_v, var_v,  # v's
    eps_q, eps_k, eps_v,
    folded_w_ptr,  # (3, K * K, C) contiguous output in the activations' dtype, tap-major
    shift_ptr,  # (3, C) contiguous float32 output
    C,
    TAPS: tl.constexpr, TAPS_P2: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = channels < C
    _fold_one(wq_ptr, gamma_q, beta_q, mean_q, var_q, eps_q, folded_w_ptr, shift_ptr,
              C, channels, c_mask, TAPS, TAPS_P2)  # fmt: skip
    _fold_one(wk_ptr, gamma_k, beta_k, mean_k, var_k, eps_k, folded_w_ptr + TAPS * C, shift_ptr + C,
              C, channels, c_mask, TAPS, TAPS_P2)  # fmt: skip
    _fold_one(wv_ptr, gamma_v, beta_v, mean_v, var_v, eps_v, folded_w_ptr + 2 * TAPS * C, shift_ptr + 2 * C,
              C, channels, c_mask, TAPS, TAPS_P2)  # fmt: skip


class ConvConfig(NamedTuple):
    """How a launch tiles the work: q positions and channels per block, warps, position blocks per program."""

    block_q: int
    block_c: int
    num_warps: int = 4
    blocks_per_program: int = 1


def default_config(n_q: int, channels: int, interpreter: bool = TRITON_INTERPRET) -> ConvConfig:
    """The table used when no config is given. On the GPU: 32 positions by 64 channels (a 128-byte line in half
    precision), one warp per 512 outputs, one position block per program. The compiler reloads the weights on every
    iteration of the position loop (it cannot prove they do not alias the outputs), so walking through more blocks
    saves only a program's setup while it raises the registers and lowers the programs resident: the loop stays a
    tuning choice for the GPU sweep (register counts and the predictions: bench/results/NOTES.md). No configuration
    picked here spills on sm_90 (tests/test_kernels_compile.py)."""
    if interpreter:
        # The interpreter pays per operation, not per element: few, large programs are what makes it fast.
        return ConvConfig(min(256, triton.next_power_of_2(n_q)), min(64, triton.next_power_of_2(channels)), 1, 1)
    block_c = min(64, max(16, triton.next_power_of_2(channels)))
    return ConvConfig(32, block_c, max(1, 32 * block_c // 512), 1)


def candidate_configs() -> list[ConvConfig]:
    """What a tuning sweep tries (bench/kernel_bench.py --sweep): tile shapes and warps that move vectors and do not
    spill on CvT's 3x3 kernels (tests/test_kernels_compile.py), each with 1 to 8 position blocks per program."""
    tiles = ((32, 32, 2), (32, 64, 4), (64, 32, 4), (64, 64, 8), (32, 128, 8))
    configs = [ConvConfig(q, c, w, per_program) for q, c, w in tiles for per_program in (1, 2, 4, 8)]
    return configs + [ConvConfig(64, 64, 4, 1), ConvConfig(128, 64, 8, 1)]


def kv_block(block_q: int, n_q: int, n_kv: int) -> int:
    """k/v positions per block: the same share of the k/v grid as block_q is of the q grid, a power of two."""
    return triton.next_power_of_2(max(1, -(-block_q * n_kv // max(n_q, 1))))


def fold_batchnorm(
    weights: list[torch.Tensor], bn_params: list[torch.Tensor], eps: list[float], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The three projections' BatchNorms folded into their depthwise weights, in one launch: weight (3, K*K, C)
    tap-major in `dtype` (the activations' dtype, as the eager path's fold is) and shift (3, C) in float32."""
    channels, taps = weights[0].shape[0], weights[0].shape[-1] * weights[0].shape[-2]
    folded_weight = torch.empty(3, taps, channels, device=weights[0].device, dtype=dtype)
    shift = torch.empty(3, channels, device=weights[0].device, dtype=torch.float32)
    block_c = min(128, triton.next_power_of_2(channels))
    with launch_guard(weights[0]):
        _fold_batchnorm_kernel[(triton.cdiv(channels, block_c),)](
            *(t.contiguous() for t in (*weights, *bn_params)), *(float(e) for e in eps), folded_weight, shift, channels,
            TAPS=taps, TAPS_P2=triton.next_power_of_2(taps), BLOCK_C=block_c,
        )  # fmt: skip
    return folded_weight, shift


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
    config: ConvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, [1 +] H*W, C) -> q (B, [1 +] Hq*Wq, C), k and v (B, [1 +] Hk*Wk, C), in x's dtype.

    weights: [q, k, v] depthwise conv weights (C, 1, K, K); bn_params: [gamma, beta, mean, var] of q, then k, then v.
    out: optional contiguous (q, k, v) to write into (preallocated buffers; the tests pass NaN-filled ones).
    config: optional ConvConfig (block sizes must be powers of two), for tests of block edges and tuning sweeps.
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
    if any(t.device != x.device for t in (*weights, *bn_params)):
        raise ValueError(f"weights and BatchNorm parameters must be on x's device, {x.device}")
    if batch > 65535:  # the batch is the grid's z axis
        raise ValueError(f"batches of at most 65535 images, got {batch}; split the batch")
    if x.stride(2) != 1:
        x = x.contiguous()

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

    folded_weight, folded_bias = fold_batchnorm(weights, bn_params, eps, x.dtype)  # (3, K*K, C), (3, C)
    if config is None:
        config = default_config(hq * wq, channels)
    block_kv = kv_block(config.block_q, hq * wq, hk * wk)
    position_blocks = max(triton.cdiv(hq * wq, config.block_q), triton.cdiv(hk * wk, block_kv))
    grid = (triton.cdiv(position_blocks, config.blocks_per_program), triton.cdiv(channels, config.block_c), batch)
    with launch_guard(x):
        _qkv_conv_bn_kernel[grid](
            x, q, k, v, folded_weight, folded_bias,
            x.stride(0), x.stride(1),
            channels, height, width, hq, wq, hk, wk,
            config.blocks_per_program,
            KSIZE=ksize, STRIDE_Q=stride_q, PAD_Q=padding_q, STRIDE_KV=stride_kv, PAD_KV=padding_kv,
            WITH_CLS=extra, BLOCK_Q=config.block_q, BLOCK_KV=block_kv, BLOCK_C=config.block_c,
            num_warps=config.num_warps,
        )  # fmt: skip
    return q, k, v


__all__ = ["ConvConfig", "candidate_configs", "default_config", "fold_batchnorm", "qkv_conv_bn"]
