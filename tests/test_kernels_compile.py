"""What the compiler makes of the kernels on Hopper (sm_90), checked without a GPU.

tests/support/sm90_compile.py drives the launchers themselves on the real CvT shapes, through Triton's own binder with a
stand-in for the CUDA driver, so each kernel is compiled exactly as a launch on an H100 would specialise it
(divisibility-by-16 hints, arguments equal to 1 made constant, the block sizes the launcher picks). From the cubin
(Triton's bundled ptxas and cuobjdump) these tests assert the properties that make the kernels fast, not only that
they compile: no register spills or local memory, shared memory within Hopper's 227 KiB, wgmma (HGMMA) in the
attention dots, and activations, weights and outputs moved in 64- or 128-bit vectors. Run under every Triton the
project supports (CI: the version it installs, and 3.6.0, the GPU machine's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from cvt_fast.kernels import attention, conv_projection  # noqa: E402

pytestmark = pytest.mark.kernel

HOPPER_MAX_SHARED = 227 * 1024
DTYPES = ("bfloat16", "float16", "float32")


def cvt_stage_shapes():
    """(model, size, stage): grid side, k/v grid side, channels, heads, cls token; for CvT-13/21 (same widths and
    heads) and CvT-W24 at 224 and 384 (kernel 3, stride_kv 2, padding 1 in every preset)."""
    shapes = {}
    for model, widths, heads in (("cvt-13/21", (64, 192, 384), (1, 3, 6)), ("cvt-w24", (192, 768, 1024), (3, 12, 16))):
        for size in (224, 384):
            for stage, side in enumerate((size // 4, size // 8, size // 16)):
                shapes[(model, size, stage)] = (side, (side + 1) // 2, widths[stage], heads[stage], stage == 2)
    return shapes


def attention_launch(launch_id, dtype, batch, n_q, n_k, heads, head_dim, config=None):
    spec = dict(op="attention", dtype=dtype, batch=batch, n_q=n_q, n_k=n_k, heads=heads, head_dim=head_dim)
    return launch_id, dict(spec, id=launch_id, config=config)


def conv_launch(
    launch_id, dtype, batch, side, channels, ksize=3, stride_kv=2, padding_kv=1, with_cls=False, config=None
):
    spec = dict(op="qkv_conv_bn", dtype=dtype, batch=batch, height=side, width=side, channels=channels)
    spec.update(ksize=ksize, stride_kv=stride_kv, padding_kv=padding_kv, with_cls=with_cls, config=config)
    return launch_id, dict(spec, id=launch_id)


def launches() -> dict:
    """Every configuration the launchers pick on CvT shapes (three dtypes, batch 1 and 256), the other head sizes
    and kernel geometries the ops give the kernels, and every sweep candidate."""
    jobs = {}
    for (model, size, stage), (side, kv_side, channels, heads, cls) in cvt_stage_shapes().items():
        n_q, n_k = side * side + cls, kv_side * kv_side + cls
        for dtype in DTYPES:
            for batch in (1, 256):
                where = f"{model}-{size}-stage{stage}-{dtype}-b{batch}"
                jobs.update([conv_launch(f"conv-{where}", dtype, batch, side, channels, with_cls=cls)])
                jobs.update([attention_launch(f"attention-{where}", dtype, batch, n_q, n_k, heads, 64)])
    for head_dim in (32, 48, 96, 128):  # what the attention op gives the kernel besides CvT's 64
        for dtype in ("bfloat16", "float32") if head_dim <= 64 else ("bfloat16",):  # float32 > 64 goes to SDPA
            jobs.update([attention_launch(f"attention-d{head_dim}-{dtype}", dtype, 8, 785, 197, 2, head_dim)])
    for ksize, stride_kv, padding_kv in ((1, 1, 0), (5, 2, 2), (7, 3, 3), (3, 1, 1), (3, 2, 0)):
        for dtype in ("bfloat16", "float32"):
            launch_id = f"conv-k{ksize}-s{stride_kv}-p{padding_kv}-{dtype}"
            jobs.update([conv_launch(launch_id, dtype, 64, 28, 192, ksize, stride_kv, padding_kv)])
    for dtype in ("bfloat16", "float32"):
        for config in attention.candidate_configs(getattr(torch, dtype)):
            launch_id = f"attention-candidate-{dtype}-" + "x".join(map(str, config))
            jobs.update([attention_launch(launch_id, dtype, 256, 3136, 784, 1, 64, list(config))])
        for config in conv_projection.candidate_configs():  # on CvT-W24's first stage: 192 channels
            launch_id = f"conv-candidate-{dtype}-" + "x".join(map(str, config))
            jobs.update([conv_launch(launch_id, dtype, 256, 56, 192, config=list(config))])
    return jobs


LAUNCHES = launches()


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # what launches use today; silences Triton 3.9's notice of a change
    script = Path(__file__).parent / "support" / "sm90_compile.py"
    result = subprocess.run(
        [sys.executable, str(script)],
        input=json.dumps(list(LAUNCHES.values())),
        capture_output=True,
        text=True,
        env=env,
        cwd=script.parent,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)["launches"]


# The kernels each launcher compiles: qkv_conv_bn folds BatchNorm into the weights (a small kernel) before the conv.
KERNELS = {"attention": ["_attention_kernel"], "conv": ["_fold_batchnorm_kernel", "_qkv_conv_bn_kernel"]}


def all_kernels_of(compiled, launch_id):
    records = compiled[launch_id]
    assert isinstance(records, list), records["error"]
    names = [record["name"] for record in records]
    assert names == KERNELS[launch_id.split("-")[0]], f"{launch_id} compiled {names}"
    return records


def kernels_of(compiled, launch_id):
    """The launch's main kernel: attention, or the conv projection (not the BatchNorm fold before it)."""
    return all_kernels_of(compiled, launch_id)[-1]


def narrow_global_accesses(opcodes: dict) -> dict:
    """Global loads and stores narrower than 64 bits (LDG.E, LDG.E.U16, STG.E.U16, ...; LDGSTS is always wide)."""
    return {
        op: n
        for op, n in opcodes.items()
        if op.startswith(("LDG.", "STG.")) and not op.endswith((".64", ".128")) and op != "LDGDEPBAR"
    }


def is_cvt_shape(launch_id):
    return launch_id.startswith(("conv-cvt", "attention-cvt", "attention-candidate", "conv-candidate"))


@pytest.mark.parametrize("launch_id", list(LAUNCHES))
def test_no_spills_no_local_memory_and_shared_memory_fits(compiled, launch_id):
    for record in all_kernels_of(compiled, launch_id):
        local = {op: n for op, n in record["opcodes"].items() if op.startswith(("LDL", "STL"))}
        what = f"{launch_id} ({record['name']})"
        assert record["STACK"] == 0 and not local, f"{what} spills: {record['REG']} registers, {local}"
        assert record["shared"] <= HOPPER_MAX_SHARED, f"{what} needs {record['shared']} bytes of shared memory"


@pytest.mark.parametrize("launch_id", [i for i in LAUNCHES if i.startswith("attention") and is_cvt_shape(i)])
def test_attention_uses_wgmma_and_vector_memory_access(compiled, launch_id):
    record = kernels_of(compiled, launch_id)
    opcodes = record["opcodes"]
    assert any(op.startswith("HGMMA") for op in opcodes), f"{launch_id}: no wgmma (HGMMA): {sorted(opcodes)}"
    assert not narrow_global_accesses(opcodes), f"{launch_id}: scalar global accesses {narrow_global_accesses(opcodes)}"
    wide = sum(n for op, n in opcodes.items() if op.startswith(("LDG", "LDGSTS")) and op.endswith(".128"))
    assert wide > 0, f"{launch_id}: no 128-bit loads"


@pytest.mark.parametrize("launch_id", [i for i in LAUNCHES if i.startswith("conv") and is_cvt_shape(i)])
def test_conv_projection_moves_vectors(compiled, launch_id):
    """Taps, folded weights and outputs in 64/128-bit vectors. The only scalar accesses allowed are the cls row's
    copy (one load, three stores, once per image and channel block)."""
    record = kernels_of(compiled, launch_id)
    narrow = narrow_global_accesses(record["opcodes"])
    with_cls = record["constants"].get("WITH_CLS") == 1
    loads = sum(n for op, n in narrow.items() if op.startswith("LDG"))
    stores = sum(n for op, n in narrow.items() if op.startswith("STG"))
    assert (loads, stores) <= ((1, 3) if with_cls else (0, 0)), f"{launch_id}: scalar global accesses {narrow}"


def test_launches_specialise_as_on_a_gpu(compiled):
    """The compile check sees what a launch builds: `blocks_per_program` == 1 becomes a constant (the position loop
    disappears) while a sweep candidate with 8 keeps it as an argument, and the attention table takes 128-row tiles
    for a big batch, 64-row ones for batch 1 (so the binder really ran on the argument values)."""
    assert kernels_of(compiled, "conv-cvt-13/21-224-stage0-bfloat16-b1")["constants"].get("blocks_per_program") == 1
    assert "blocks_per_program" not in kernels_of(compiled, "conv-candidate-bfloat16-32x64x4x8")["constants"]
    assert kernels_of(compiled, "attention-cvt-13/21-224-stage0-bfloat16-b256")["constants"]["BLOCK_M"] == 128
    assert kernels_of(compiled, "attention-cvt-13/21-224-stage0-bfloat16-b1")["constants"]["BLOCK_M"] == 64
