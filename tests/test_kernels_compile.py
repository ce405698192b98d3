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


def attention_jobs():
    """Every distinct configuration the table picks for CvT stages at batch 1 and 256, head_dim 64 and 128."""
    jobs = {}
    for dtype, name in TYPES.items():
        for head_dim in (64, 128):
            for n_q, n_k in ((3137, 785), (9216, 2304), (197, 50)):
                for programs in (1, 256 * 3):
                    block_m, block_n, warps, stages = attention.table_config(
                        n_q, n_k, head_dim, dtype, programs, interpreter=False
                    )
                    job_id = f"attention-{name}-d{head_dim}-{block_m}x{block_n}-w{warps}-s{stages}"
                    jobs[job_id] = dict(
                        id=job_id,
                        kernel="attention",
                        dtype=name,
                        constants=dict(
                            HEAD_DIM=head_dim,
                            BLOCK_D=triton.next_power_of_2(head_dim),
                            BLOCK_M=block_m,
                            BLOCK_N=block_n,
                            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                        ),
                        options=dict(num_warps=warps, num_stages=stages),
                    )
    return jobs


def conv_jobs():
    jobs = {}
    for name in TYPES.values():
        for with_cls, grid, channels in ((0, 56, 64), (1, 14, 384)):
            n_q, n_kv = grid * grid, ((grid + 1) // 2) ** 2
            block_q, block_kv, block_c, warps = conv_projection.block_sizes(n_q, n_kv, channels, interpreter=False)
            job_id = f"qkv_conv_bn-{name}-cls{with_cls}-{block_q}x{block_c}-w{warps}"
            constants = dict(KSIZE=3, STRIDE_Q=1, PAD_Q=1, STRIDE_KV=2, PAD_KV=1, WITH_CLS=with_cls)
            constants.update(BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_C=block_c)
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
