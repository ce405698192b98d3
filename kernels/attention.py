"""Flash attention for CvT: queries over the full grid, keys/values over the strided grid, CvT's scale.

Computes softmax(q k^T * scale) v for every head, with q (B, Nq, C) and k, v (B, Nk, C) read straight from the
outputs of the q/k/v Linear layers (head h is columns h*D .. h*D+D-1, read by stride), and writes (B, Nq, C) for
the output projection: no permute or contiguous copy on either side. Online softmax in base 2 with the scale folded
into the exponent's multiply-add, float32 accumulation; only the last key block is masked, so any Nq and Nk (the
cls token adds one to each) and head_dim 32..128 (padded to a power of two inside the kernel) work.

float32 inputs run their dots as three TF32 tensor-core products ("tf32x3": float32-level accuracy, as eager
float32 attention computes it on Hopper). Exact float32 dots on the FMA units would need every key block's
head_dim slice of q and k in each thread's registers: they spill at any useful tile size on sm_90.

Block sizes: `default_config` (a table by dtype, head_dim and how many programs a launch makes, so batch 1 still
fills the GPU), `candidate_configs` for tuning sweeps, an explicit `config=`, or, with CVT_FAST_AUTOTUNE=1,
triton.autotune among the candidates per (Nq, Nk, head_dim, batch*heads bucket).
Not covered (the eager path serves them): autograd, dropout on the probabilities, head_dim outside 32..128, and
float32 beyond head_dim 64 (the tf32x3 dots spill registers there; correct, but slow).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import HOPPER_SMS, TRITON_INTERPRET, launch_guard, multiprocessor_count

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    q, acc, m_i, l_i, k_base, v_base, start, stride_kn, stride_vn, Nk, qk_scale, dims,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # only the last block can hold keys past Nk
):  # fmt: skip
    """One block of keys and values folded into the running (acc, m_i, l_i). m_i is in scaled base-2 units."""
    n = start + tl.arange(0, BLOCK_N)
    key_mask = n < Nk
    dim_mask = dims < HEAD_DIM
    k_pointers = k_base + n[None, :] * stride_kn + dims[:, None]  # (BLOCK_D, BLOCK_N): k transposed by addressing
    v_pointers = v_base + n[:, None] * stride_vn + dims[None, :]
    if MASK_KEYS:
        k_t = tl.load(k_pointers, mask=dim_mask[:, None] & key_mask[None, :], other=0.0)
    elif BLOCK_D != HEAD_DIM:
        k_t = tl.load(k_pointers, mask=dim_mask[:, None], other=0.0)
    else:
        k_t = tl.load(k_pointers)
    scores = tl.dot(q, k_t, input_precision=DOT_PRECISION)  # raw q.k; the scale goes into the exponent below
    if MASK_KEYS:
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
    # qk_scale > 0 (checked by the launcher), so max(scores) * qk_scale is the max of the scaled scores.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1) * qk_scale)  # finite: every block has at least one valid key
    p = tl.exp2(scores * qk_scale - m_new[:, None])  # one FMA per score
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASK_KEYS:
        v = tl.load(v_pointers, mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
    elif BLOCK_D != HEAD_DIM:
        v = tl.load(v_pointers, mask=dim_mask[None, :], other=0.0)
    else:
        v = tl.load(v_pointers)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["tune_programs"])
def _attention_kernel(
    q_ptr,  # (B, Nq, H * HEAD_DIM), channel stride 1
    k_ptr,  # (B, Nk, H * HEAD_DIM), channel stride 1
    v_ptr,  # (B, Nk, H * HEAD_DIM), channel stride 1
    o_ptr,  # (B, Nq, H * HEAD_DIM) output, contiguous
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    Nq, Nk, num_heads,
    qk_scale,  # CvT's scale * log2(e), > 0: the softmax runs in base 2
    tune_programs,  # bucket of B * heads; only read by the autotuner's key, so never specialised on
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32x3" for float32 inputs; half types ignore it
):  # fmt: skip
    # One flat grid (CUDA's y axis stops at 65535, and batch * heads can pass that); consecutive programs take
    # consecutive query blocks of one head, which read the same keys and values while they are in L2.
    blocks_m = tl.cdiv(Nq, BLOCK_M)
    pid_m = tl.program_id(0) % blocks_m
    pid_bh = tl.program_id(0) // blocks_m
    b = (pid_bh // num_heads).to(tl.int64)
    head_offset = (pid_bh % num_heads) * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < Nq
    io_mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]

    q_pointers = q_ptr + b * stride_qb + rows[:, None] * stride_qn + head_offset + dims[None, :]
    q = tl.load(q_pointers, mask=io_mask, other=0.0)
    k_base = k_ptr + b * stride_kb + head_offset
    v_base = v_ptr + b * stride_vb + head_offset
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    full_blocks_end = (Nk // BLOCK_N) * BLOCK_N
    for start in range(0, full_blocks_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_base, v_base, start, stride_kn, stride_vn, Nk, qk_scale,
                                      dims, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION, False)  # fmt: skip
    if full_blocks_end < Nk:  # the last, partial block of keys: the only one that needs a mask
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_base, v_base, full_blocks_end, stride_kn, stride_vn, Nk,
                                      qk_scale, dims, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION, True)  # fmt: skip
    out = acc / l_i[:, None]
    o_rows = b * Nq + rows
    tl.store(
        o_ptr + o_rows[:, None] * (num_heads * HEAD_DIM) + head_offset + dims[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=io_mask,
    )


class AttentionConfig(NamedTuple):
    """How a launch tiles the work: query rows and keys per block, warps, software-pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


# Candidates for sweeps and CVT_FAST_AUTOTUNE=1, half precision: all use wgmma and none spills registers on sm_90
# at head_dim 64 (tests/test_kernels_compile.py compiles each as a launch would). 32-row tiles are too short for
# wgmma (64 rows per warpgroup) and are left out.
_CANDIDATES = [
    AttentionConfig(128, 64, 8, 3),
    AttentionConfig(128, 32, 8, 3),
    AttentionConfig(128, 64, 4, 3),
    AttentionConfig(64, 64, 4, 3),
    AttentionConfig(64, 32, 4, 3),
    AttentionConfig(64, 64, 4, 2),
]
# float32 (three TF32 products per dot): 16-key blocks keep the registers under 255.
_FP32_CANDIDATES = [AttentionConfig(64, 16, 4, 2), AttentionConfig(64, 16, 4, 1), AttentionConfig(64, 16, 4, 3)]


def _autotuner(candidates: list[AttentionConfig]):
    return triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in candidates
        ],
        key=["Nq", "Nk", "HEAD_DIM", "tune_programs"],
    )(_attention_kernel)


# One per candidate list: float32 must never be tuned over tiles that spill its registers.
_autotuned = {"half": _autotuner(_CANDIDATES), "float32": _autotuner(_FP32_CANDIDATES)}
_tuned_keys: set[tuple] = set()  # what the autotuner has already measured (it cannot inside a CUDA graph capture)


def candidate_configs(dtype: torch.dtype = torch.bfloat16) -> list[AttentionConfig]:
    """What a tuning sweep tries (bench/kernel_bench.py --sweep)."""
    return list(_FP32_CANDIDATES if dtype == torch.float32 else _CANDIDATES)


def default_config(
    n_q: int, n_k: int, head_dim: int, dtype: torch.dtype, programs: int, num_sms: int = HOPPER_SMS,
    interpreter: bool = TRITON_INTERPRET,
) -> AttentionConfig:  # fmt: skip
    """The table used when no config is given (programs = batch * heads). No row spills registers on sm_90
    (tests/test_kernels_compile.py)."""
    if interpreter:  # it pays per operation, not per element: few, large tiles (tl.dot needs >= 16)
        return AttentionConfig(
            min(64, max(16, triton.next_power_of_2(n_q))), min(64, max(16, triton.next_power_of_2(n_k))), 1, 1
        )
    if dtype == torch.float32:
        return _FP32_CANDIDATES[0]
    if head_dim > 64:
        return AttentionConfig(64, 64, 4, 3)
    # 128-row tiles read each key and value block for twice as many queries; take them whenever they still leave
    # two waves of programs and pad the last tile by no more than 10% over what 64-row tiles would.
    tiles = triton.cdiv(n_q, 128)
    if tiles * programs >= 2 * num_sms and tiles * 128 <= 1.1 * triton.cdiv(n_q, 64) * 64:
        return AttentionConfig(128, 64, 8, 3)
    return AttentionConfig(64, 64, 4, 3)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    scale: float,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C) in q's dtype; C = num_heads * head_dim; scale > 0.
    out: optional contiguous (B, Nq, C) to write into. config: optional AttentionConfig (blocks: powers of two,
    >= 16), for tests of block edges and for tuning sweeps."""
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(
            f"expected q (B, Nq, C), k and v (B, Nk, C); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, n_q, channels = q.shape
    n_k = k.shape[1]
    if k.shape[0] != batch or k.shape[2] != channels or channels % num_heads:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree, or C is not divisible by {num_heads} heads"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if n_k == 0:
        raise ValueError("attention needs at least one key")
    if not scale > 0:
        raise ValueError(f"scale must be positive (CvT's is embed_dim ** -0.5), got {scale}")
    head_dim = channels // num_heads
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(batch, n_q, channels, device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    programs = batch * num_heads
    tune_bucket = 1 << max(programs - 1, 0).bit_length()
    args = (
        q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        n_q, n_k, num_heads, scale * LOG2E, tune_bucket,
    )  # fmt: skip
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "tf32x3"  # only float32 operands read it
    with launch_guard(q):
        if os.environ.get("CVT_FAST_AUTOTUNE") == "1" and config is None and not TRITON_INTERPRET:
            _check_tuned_before_capture((n_q, n_k, head_dim, tune_bucket, q.dtype))
            grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * programs,)  # noqa: E731
            tuner = _autotuned["float32" if q.dtype == torch.float32 else "half"]
            tuner[grid](*args, HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=precision)
        else:
            if config is None:
                config = default_config(n_q, n_k, head_dim, q.dtype, programs, multiprocessor_count(q.device))
            _attention_kernel[(triton.cdiv(n_q, config.block_m) * programs,)](
                *args, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
    return out


def _check_tuned_before_capture(key: tuple) -> None:
    """The autotuner benchmarks (and synchronises) on a shape's first call, which CUDA graph capture forbids."""
    if key not in _tuned_keys:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "CVT_FAST_AUTOTUNE=1: the attention kernel has not been tuned for this shape yet (Nq, Nk, head_dim, "
                f"batch*heads bucket, dtype = {key}), and tuning cannot run inside CUDA graph capture; run one "
                "forward pass with the same input shape before capturing"
            )
        _tuned_keys.add(key)


__all__ = ["AttentionConfig", "candidate_configs", "default_config", "flash_attention"]
