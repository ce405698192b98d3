"""Kernel-level benchmarks through pytest-benchmark (CUDA only):

    python -m pytest bench/test_kernel_benchmarks.py --benchmark-enable --benchmark-json=bench/results/k.json

Each fused op on the CvT-13 stage shapes at batch 32, bfloat16, next to the eager PyTorch it replaces. For the
full comparison (all models and batches, torch.compile and SDPA backends, errors, bandwidth) see bench/kernel_bench.py.
"""

import pytest
import torch

from cvt_fast import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA device")

STAGES = {"stage0": (56, 64, 1, False), "stage1": (28, 192, 3, False), "stage2": (14, 384, 6, True)}
BATCH, DTYPE = 32, torch.bfloat16


def cuda_timed(benchmark, fn):
    """pytest-benchmark times host wall clock: synchronise so each round covers the kernel, not just its launch."""

    def run():
        fn()
        torch.cuda.synchronize()

    for _ in range(5):
        run()
    benchmark.pedantic(run, rounds=50, iterations=5)


def conv_inputs(grid, channels, with_cls):
    generator = torch.Generator().manual_seed(0)
    params = []
    for stride in (1, 2, 2):
        tensors = [torch.randn(channels, 1, 3, 3, generator=generator)] + [
            torch.rand(channels, generator=generator) + 0.5 for _ in range(4)
        ]
        params.append(ops.ConvBN(*(t.to("cuda", DTYPE) for t in tensors), 1e-5, stride, 1))
    x = torch.randn(BATCH, int(with_cls) + grid * grid, channels, generator=generator).to("cuda", DTYPE)
    return x, params


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("implementation", ["kernel", "eager"])
def test_qkv_projection(benchmark, stage, implementation):
    from cvt_fast.kernels import qkv_conv_bn

    grid, channels, _, with_cls = STAGES[stage]
    x, params = conv_inputs(grid, channels, with_cls)
    if implementation == "kernel":
        flat = ops.qkv_operands(*params)
        cuda_timed(benchmark, lambda: qkv_conv_bn(x, grid, grid, with_cls, *flat))
    else:
        cuda_timed(benchmark, lambda: ops.qkv_projection_reference(x, grid, grid, with_cls, *params))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("implementation", ["kernel", "sdpa"])
def test_attention(benchmark, stage, implementation):
    from cvt_fast.kernels import flash_attention

    grid, channels, heads, with_cls = STAGES[stage]
    n_q, n_k = grid * grid + int(with_cls), ((grid + 1) // 2) ** 2 + int(with_cls)
    q, k, v = (torch.randn(BATCH, n, channels, device="cuda", dtype=DTYPE) for n in (n_q, n_k, n_k))
    fn = flash_attention if implementation == "kernel" else ops.attention_reference
    cuda_timed(benchmark, lambda: fn(q, k, v, heads, channels**-0.5))
