"""Flash attention for CvT: queries over the full grid, keys/values over the strided grid, CvT's scale.

Computes softmax(q k^T * scale) v for every head, with q (B, Nq, C) and k, v (B, Nk, C) read straight from the
outputs of the q/k/v Linear layers (head h is columns h*D .. h*D+D-1, read by stride), and writes (B, Nq, C) for
the output projection: no permute or contiguous copy on either side. Online softmax (exp2, scale folded into
log2 e), float32 accumulation, masked tails on both lengths, so any Nq and Nk (the cls token adds one to each)
and head_dim 32..128 (padded to a power of two inside the kernel) work. float32 inputs use exact float32 dot
products (input_precision="ieee"), not TF32, so float32 keeps float32 accuracy.

Block sizes: a table by dtype, head_dim and how many programs a launch makes (so batch 1 still fills the GPU);
with CVT_FAST_AUTOTUNE=1, triton.autotune picks among candidates per (Nq, Nk, head_dim, batch*heads bucket).
Not covered (the eager path serves them): autograd, dropout on the probabilities, head_dim outside 32..128.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..dispatch import TRITON_INTERPRET

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    q_ptr,  # (B, Nq, H * HEAD_DIM), channel stride 1
    k_ptr,  # (B, Nk, H * HEAD_DIM), channel stride 1
    v_ptr,  # (B, Nk, H * HEAD_DIM), channel stride 1
    o_ptr,  # (B, Nq, H * HEAD_DIM) output, contiguous
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    Nq, Nk, num_heads,
    qk_scale,  # CvT's scale * log2(e): the softmax runs in base 2
    tune_programs,  # bucket of B * heads; only read by the autotuner's key
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (exact, no TF32); the default "tf32" for half types
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
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < Nq
    dim_mask = dims < HEAD_DIM

    q = tl.load(
        q_ptr + b * stride_qb + rows[:, None] * stride_qn + head_offset + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    k_base = k_ptr + b * stride_kb + head_offset
    v_base = v_ptr + b * stride_vb + head_offset
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, Nk, BLOCK_N):
        n = start + cols
        n_mask = n < Nk
        k_t = tl.load(  # (BLOCK_D, BLOCK_N): k transposed by addressing
            k_base + n[None, :] * stride_kn + dims[:, None], mask=dim_mask[:, None] & n_mask[None, :], other=0.0
        )
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every block has at least one valid key
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + n[:, None] * stride_vn + dims[None, :], mask=n_mask[:, None] & dim_mask[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = b * Nq + rows
    tl.store(
        o_ptr + o_rows[:, None] * (num_heads * HEAD_DIM) + head_offset + dims[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


# Candidates for CVT_FAST_AUTOTUNE=1: (BLOCK_M, BLOCK_N, num_warps, num_stages), none of which spills registers
# at head_dim 64 on sm_90 (ptxas resource usage, checked by tests/test_kernels_compile.py for the table below).
_CANDIDATES = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)]
_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _CANDIDATES],
    key=["Nq", "Nk", "HEAD_DIM", "tune_programs"],
)(_attention_kernel)


def table_config(
    n_q: int, n_k: int, head_dim: int, dtype: torch.dtype, programs: int, interpreter: bool = TRITON_INTERPRET
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) without autotuning. The GPU rows avoid register spills on sm_90
    (ptxas resource usage); their speed is not yet measured on Hopper."""
    if interpreter:  # it pays per operation, not per element: few, large tiles (tl.dot needs >= 16)
        return min(64, max(16, triton.next_power_of_2(n_q))), min(64, max(16, triton.next_power_of_2(n_k))), 1, 1
    if dtype == torch.float32:  # exact fp32 dots run on FMA units: smaller tiles keep the registers in check
        return (32, 32, 4, 2) if head_dim <= 64 else (64, 32, 8, 2)
    if head_dim > 64:
        return 64, 64, 4, 3
    # Big query grids take 128-row tiles, unless that leaves fewer than two waves of programs on 132 SMs.
    if n_q >= 1024 and triton.cdiv(n_q, 128) * programs >= 264:
        return 128, 64, 8, 3
    return 64, 64, 4, 3


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    scale: float,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C) in q's dtype; C = num_heads * head_dim.
    out: optional contiguous (B, Nq, C) to write into. blocks: optional (BLOCK_M, BLOCK_N), powers of two >= 16,
    for tests of block edges and for tuning sweeps."""
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
    if n_k == 0:
        raise ValueError("attention needs at least one key")
    head_dim = channels // num_heads
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(batch, n_q, channels, device=q.device, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    programs = batch * num_heads
    args = (
        q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        n_q, n_k, num_heads, scale * LOG2E, 1 << max(programs - 1, 0).bit_length(),
    )  # fmt: skip
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # only float32 operands read it
    if os.environ.get("CVT_FAST_AUTOTUNE") == "1" and blocks is None and not TRITON_INTERPRET:
        grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]) * programs,)  # noqa: E731
        _autotuned[grid](*args, HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=precision)
    else:
        block_m, block_n, num_warps, num_stages = table_config(n_q, n_k, head_dim, q.dtype, programs)
        if blocks is not None:
            block_m, block_n = blocks
        _attention_kernel[(triton.cdiv(n_q, block_m) * programs,)](
            *args, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return out


__all__ = ["flash_attention"]
