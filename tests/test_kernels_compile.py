"""The kernels compile for Hopper (sm_90), in the configurations the launchers pick, without spilling registers.

No GPU needed: Triton's own compiler and its bundled ptxas build the cubin, and cuobjdump reads its resource usage
(tests/hopper_compile.py, in a subprocess, since this process runs Triton's interpreter). This catches what the
interpreter cannot: tl.dot's shape and dtype rules, layouts, register pressure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip("the ahead-of-time compile here uses Triton 3.9's compiler API", allow_module_level=True)

from cvt_fast.kernels import attention, conv_projection  # noqa: E402

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def attention_job(dtype, head_dim, block_m, block_n, warps, stages):
    name = TYPES[dtype]
    job_id = f"attention-{name}-d{head_dim}-{block_m}x{block_n}-w{warps}-s{stages}"
    constants = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    return job_id, dict(
        id=job_id, kernel="attention", dtype=name, constants=constants, options=dict(num_warps=warps, num_stages=stages)
    )


def attention_jobs():
    """Every distinct configuration the table picks for CvT stages at batch 1 and 256, for every head_dim class the
    kernel takes (32..128; 48 and 96 pad to a power of two); and the autotuner's candidates at head_dim 64."""
    jobs = dict(attention_job(torch.bfloat16, 64, *candidate) for candidate in attention._CANDIDATES)
    for dtype in (torch.bfloat16, torch.float32):  # float16 compiles as bfloat16 does; one of them is enough
        for head_dim in (32, 48, 64, 96, 128):
            for n_q, n_k in ((3137, 785), (9216, 2304), (197, 50)):
                for programs in (1, 256 * 3):
                    config = attention.table_config(n_q, n_k, head_dim, dtype, programs, interpreter=False)
                    jobs.update([attention_job(dtype, head_dim, *config)])
    return jobs


def conv_jobs():
    """The configurations the launcher picks for CvT stage shapes, with and without a cls token, and other kernel
    sizes and strides the op accepts."""
    jobs = {}
    geometries = [
        (3, 2, 1, 0, 56, 64),
        (3, 2, 1, 1, 14, 384),
        (1, 1, 0, 0, 28, 192),
        (5, 2, 2, 1, 14, 96),
        (7, 3, 3, 0, 24, 40),
    ]
    for dtype, name in TYPES.items():
        for ksize, stride_kv, pad_kv, with_cls, grid, channels in geometries:
            if ksize != 3 and dtype != torch.bfloat16:
                continue  # other kernel sizes once, in one dtype
            n_q, n_kv = grid * grid, ((grid + 2 * pad_kv - ksize) // stride_kv + 1) ** 2
            block_q, block_kv, block_c, warps = conv_projection.block_sizes(
                n_q, n_kv, channels, ksize, interpreter=False
            )
            job_id = f"qkv_conv_bn-{name}-k{ksize}s{stride_kv}-cls{with_cls}-{block_q}x{block_c}-w{warps}"
            constants = dict(KSIZE=ksize, STRIDE_Q=1, PAD_Q=ksize // 2, STRIDE_KV=stride_kv, PAD_KV=pad_kv)
            constants.update(WITH_CLS=with_cls, BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_C=block_c)
            jobs[job_id] = dict(
                id=job_id, kernel="qkv_conv_bn", dtype=name, constants=constants, options={"num_warps": warps}
            )
    return jobs


JOBS = {**attention_jobs(), **conv_jobs()}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_compile.py")
    result = subprocess.run(
        [sys.executable, str(script)],
        input=json.dumps(list(JOBS.values())),
        capture_output=True,
        text=True,
        env=env,
        cwd=script.parent,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("job_id", list(JOBS))
def test_compiles_for_sm90_without_register_spills(compiled, job_id):
    usage = compiled[job_id]
    assert "error" not in usage, usage.get("error")
    assert usage["STACK"] == 0, f"{job_id} spills registers: {usage}"
