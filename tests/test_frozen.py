"""cvt_fast.freeze, FrozenCvt and load_frozen on AOTInductor (engine="inductor", the engine that needs nothing but
torch), tried as a user would: frozen from a transformers model and from a cvt_fast one, held to transformers' numbers
and to float64, saved as a .pt2 and loaded in a fresh process without transformers or a compile, and every misuse
refused in one line. Each compile takes tens of seconds, so the frozen models are made once per module and shared.
The other engines, auto's choice and .cvt packages: test_frozen_engines.py."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import cvt_fast
from cvt_fast import frozen as frozen_module
from cvt_fast.cpu_target import RELEVANT_FLAGS, CpuTarget, cannot_run, this_cpu
from cvt_fast.errors import CheckpointError, CheckpointNotFoundError, InputError, InputTypeError
from cvt_fast.frozen import package
from cvt_fast.frozen.engines import inductor

from support.helpers import FLOORS, TRAINABLE, harden_statistics_, model_pair, rel_err

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

# Non-square, sizes no block divides, a cls token on the last stage only.
HEIGHT, WIDTH, BATCH = 40, 36, 3


@pytest.fixture(scope="module")
def pair():
    """(transformers, cvt_fast) classifiers with the same random weights and statistics that make every term matter."""
    return harden_statistics_(model_pair(TRAINABLE | {"num_labels": 7}), torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def frozen_f32(pair, tmp_path_factory):
    """transformers' own model, frozen as it is (float32), and its package saved."""
    frozen = cvt_fast.freeze(pair[0], batch_size=BATCH, image_size=(HEIGHT, WIDTH), engine="inductor")
    path = tmp_path_factory.mktemp("package") / "cvt.pt2"
    frozen.save(path)
    return frozen, path


@pytest.fixture(scope="module")
def base_bf16():
    """A cvt_fast base model (no head) and its bfloat16 freeze for any batch up to BATCH."""
    _, model = harden_statistics_(model_pair(TRAINABLE, head=False, seed=1), torch.Generator().manual_seed(1))
    return model, cvt_fast.freeze(model, batch_size=BATCH, image_size=(HEIGHT, WIDTH), dtype=torch.bfloat16,
                                  dynamic_batch=True, engine="inductor")  # fmt: skip


def images(count=BATCH, seed=0, dtype=torch.float32):
    return torch.randn(count, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_float32_is_transformers_within_the_parity_rule(pair, frozen_f32):
    hf, _ = pair
    frozen, _ = frozen_f32
    x = images()
    with torch.no_grad():
        expected = hf(x).logits
    actual = frozen(x).logits
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert torch.isfinite(actual).all() and rel_err(actual, expected) < 2e-5
    assert frozen.info.validation["logits"] < 2e-5  # what freeze checked it with
    assert frozen._runner._weights is not None  # its weights copied out of AOTInductor's block (the fast way)


def test_a_smaller_batch_runs_padded_with_the_same_answers(frozen_f32):
    frozen, _ = frozen_f32
    x = images()
    full = frozen(x).logits
    kept = full.clone()
    frozen(images(seed=9))
    assert torch.equal(full, kept)  # an output is the caller's: the next call does not write into it
    for count in (1, 2):
        assert torch.equal(frozen(x[:count]).logits, full[:count])


def test_outputs_as_the_model_gives_them(pair, frozen_f32):
    frozen, _ = frozen_f32
    x = images()
    as_tuple = frozen(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], frozen(x)["logits"])
    assert isinstance(frozen(x), cvt_fast.ImageClassifierOutputWithNoAttention)


@pytest.mark.parametrize(
    "pixel_values, kind, message",
    [
        (torch.randn(BATCH + 1, 3, HEIGHT, WIDTH), InputError, f"({BATCH} or fewer, 3, {HEIGHT}, {WIDTH}) float32"),
        (torch.randn(BATCH, 3, WIDTH, HEIGHT), InputError, "freeze again for another shape"),
        (torch.randn(3, HEIGHT, WIDTH), InputError, "has shape (3, 40, 36)"),
        (torch.randn(BATCH, 3, HEIGHT, WIDTH).double(), InputTypeError, "frozen for torch.float32"),
        (torch.randn(BATCH, 3, HEIGHT, WIDTH, requires_grad=True), InputError, "inference only"),
        ([[0.0]], InputTypeError, "must be a torch.Tensor"),
        (None, InputTypeError, "must be a torch.Tensor"),
    ],
)
def test_other_inputs_are_refused_naming_the_frozen_shape(frozen_f32, pixel_values, kind, message):
    frozen, _ = frozen_f32
    with pytest.raises(kind, match=message.replace("(", r"\(").replace(")", r"\)")):
        frozen(pixel_values)


def test_a_snapshot_that_edits_do_not_reach_and_a_model_left_as_it_was(pair):
    hf, model = pair
    model = cvt_fast.from_transformers(hf)  # shares hf's tensors: freezing must not cast or touch them
    before = {name: t.clone() for name, t in model.state_dict().items()}
    frozen = frozen_module.FrozenCvt  # the type, for the repr check below
    x = images()
    snapshot = cvt_fast.freeze(model, batch_size=BATCH, image_size=(HEIGHT, WIDTH), dtype="bfloat16", engine="inductor")
    assert isinstance(snapshot, frozen) and "edits to the model after freezing do not reach it" in repr(snapshot)
    for name, tensor in model.state_dict().items():  # a bfloat16 freeze did not round the float32 weights
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert not model.training and model.backend == "auto"
    answer = snapshot(x.bfloat16()).logits
    with torch.no_grad():
        model.classifier.weight.data += 1.0  # as peft's merge writes: through .data
    assert torch.equal(snapshot(x.bfloat16()).logits, answer)
    with torch.no_grad():
        model.classifier.weight.data -= 1.0
    assert not hasattr(snapshot, "train") and not hasattr(snapshot, "parameters")


def test_bfloat16_base_model_within_the_rule_for_any_batch(base_bf16):
    model, frozen = base_bf16
    x = images(seed=5)
    with torch.no_grad():
        exact = model.double()(x.double())
        eager = model.to(torch.bfloat16)(x.bfloat16())
        model.float()
    for count in (BATCH, 1):  # dynamic batch: one package, no padding
        out = frozen(x[:count].bfloat16())
        assert set(out.keys()) == {"last_hidden_state", "cls_token_value"}
        for name in ("last_hidden_state", "cls_token_value"):
            got, reference, same_dtype = out[name], exact[name][:count], eager[name][:count]
            assert got.shape == reference.shape and torch.isfinite(got).all()
            assert rel_err(got, reference) <= 2 * rel_err(same_dtype, reference) + FLOORS[torch.bfloat16], name
    assert "pixel_values (1 to 3, 3, 40, 36) bfloat16" in repr(frozen)


def test_saved_package_loads_in_a_fresh_process_without_transformers_or_a_compile(frozen_f32, tmp_path):
    frozen, path = frozen_f32
    x = images(seed=7)
    torch.save(x, tmp_path / "x.pt")
    cache = tmp_path / "inductor-cache"
    code = f"""
import sys, json, os, torch
sys.modules["transformers"] = None  # any import of transformers fails
import cvt_fast
frozen = cvt_fast.load_frozen({str(path)!r})
torch.save(frozen(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "y.pt")!r})
print(json.dumps({{"repr": repr(frozen), "labels": frozen.config.num_labels}}))
"""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["labels"] == 7 and "float32" in report["repr"]
    assert torch.equal(torch.load(tmp_path / "y.pt"), frozen(x).logits)
    # Loading probes which vector ISAs compile here (tiny __avx_chk_kernel programs), and compiles nothing of the model.
    sources = [p.read_text() for p in cache.rglob("*.cpp")] if cache.exists() else []
    assert all("_chk_kernel" in source and "cpp_fused" not in source for source in sources), "loading compiled code"


def with_record(path, tmp_path, **changes):
    """A copy of a .pt2 package whose record (in its AOTInductor metadata) says something else."""
    copy = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}.pt2"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            metadata = json.loads(data) if name.endswith("_metadata.json") else {}
            if inductor.METADATA_KEY in metadata:
                record = json.loads(metadata[inductor.METADATA_KEY])
                record.update(changes)
                metadata[inductor.METADATA_KEY] = json.dumps(record)
                data = json.dumps(metadata).encode()
            target.writestr(name, data)
    return copy


def test_a_package_built_for_more_than_this_cpu_is_refused_before_loading(frozen_f32, tmp_path, monkeypatch):
    """Its record claims instructions this CPU lacks (written here, so any CPU the suite runs on sees the refusal)."""
    _, path = frozen_f32
    here = this_cpu()
    target = here.as_dict()
    lacking = [flag for flag in RELEVANT_FLAGS if flag not in here.flags]
    if lacking:
        target.update(flags=sorted({*here.flags, *lacking}))  # the same capability, so the flags are what refuses
    else:  # a CPU with every flag: claim another machine instead
        target.update(machine="riscv64")
    claimed = with_record(path, tmp_path, target=target)
    loaded = []
    monkeypatch.setattr(inductor, "load", lambda files, info: loaded.append(files))
    with pytest.raises(package.PackageMismatchError, match="cannot run on this CPU") as refusal:
        cvt_fast.load_frozen(claimed)
    assert "\n" not in str(refusal.value) and not loaded
    assert (
        f"may use {', '.join(sorted(lacking))}, which this CPU lacks" if lacking else "compiled for riscv64"
    ) in str(refusal.value)
    weaker = CpuTarget(here.machine, "AVX2", tuple(f for f in here.flags if "512" not in f and "amx" not in f),
                       False, "an AVX2-only CPU")  # fmt: skip
    monkeypatch.setattr(package, "this_cpu", lambda: weaker)  # the package as built, on a weaker CPU
    if cannot_run(frozen_module.read_package_info(path).target, weaker) is not None:
        with pytest.raises(package.PackageMismatchError, match="an AVX2-only CPU"):
            cvt_fast.load_frozen(path)
    assert not loaded


def test_a_package_from_another_torch_is_refused(frozen_f32, monkeypatch):
    _, path = frozen_f32
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with pytest.raises(frozen_module.PackageMismatchError, match=r"compiled with torch .*; this is torch 9\.9\.9"):
        cvt_fast.load_frozen(path)


def test_a_process_capped_at_avx2_refuses_an_avx512_package(frozen_f32):
    """The real thing, where the package was built for AVX-512: a process forced to AVX2 refuses it in one line."""
    _, path = frozen_f32
    if frozen_module.read_package_info(path).target.capability != "AVX512":
        pytest.skip("the package was not compiled for AVX-512 on this CPU")
    code = f"import cvt_fast; cvt_fast.load_frozen({str(path)!r})"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "PackageMismatchError" in result.stderr
    assert "compiled for AVX512 vectors and this process runs AVX2" in result.stderr


@pytest.mark.parametrize(
    "built, here, expected",
    [
        (
            dict(capability="AVX2", flags=("avx2", "fma")),
            dict(capability="AVX512", flags=("avx2", "fma", "avx512f")),
            None,
        ),
        (dict(capability="AVX512"), dict(capability="AVX2"), "compiled for AVX512 vectors"),
        (dict(flags=("avx2", "amx_tile")), dict(flags=("avx2",)), "amx_tile, which this CPU lacks"),
        (dict(onednn_native_bfloat16=True), dict(onednn_native_bfloat16=False), "native bfloat16 units"),
        (dict(machine="aarch64"), dict(), "compiled for aarch64"),
    ],
)
def test_which_cpu_runs_which_package(built, here, expected):
    def target(**fields):
        base = dict(machine="x86_64", capability="AVX512", flags=("avx2",), onednn_native_bfloat16=False,
                    model_name="cpu")  # fmt: skip
        return CpuTarget(**(base | fields))

    reason = cannot_run(target(**built), target(**here))
    assert (reason is None) if expected is None else (expected in reason)


def test_things_that_are_not_packages_get_one_line(tmp_path):
    (tmp_path / "notes.pt2").write_text("hello")
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as archive:
        archive.writestr("other/data/aotinductor/model/x_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cpu"}))
    cases = [
        (tmp_path / "missing.pt2", CheckpointNotFoundError, "no such file"),
        (tmp_path, CheckpointError, "is a folder"),
        (tmp_path / "notes.pt2", CheckpointError, "not a readable package"),
        (tmp_path / "other.pt2", CheckpointError, "not a cvt_fast frozen package"),
    ]
    for path, kind, message in cases:
        with pytest.raises(kind, match=message) as refusal:
            cvt_fast.load_frozen(path)
        assert "\n" not in str(refusal.value)


def test_models_that_cannot_be_frozen_are_refused(pair):
    _, model = pair
    with pytest.raises(InputError, match=r"training mode; call model.eval\(\)"):
        cvt_fast.freeze(model.train())
    model.eval()
    with pytest.raises(InputTypeError, match="takes a CvtForImageClassification or CvtModel"):
        cvt_fast.freeze(torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="torch.float32, torch.bfloat16 or 'fastest'"):
        cvt_fast.freeze(model, dtype=torch.float16)
    with pytest.raises(InputError, match="batch_size"):
        cvt_fast.freeze(model, batch_size=0)
    with pytest.raises(InputError, match="image_size"):
        cvt_fast.freeze(model, image_size="224")
    with pytest.raises(ValueError, match="at least"):  # too small for the model's strides
        cvt_fast.freeze(model, image_size=4)
    meta = cvt_fast.CvtForImageClassification(model.config).to("meta").eval()
    with pytest.raises(InputError, match="freeze compiles for the CPU"):
        cvt_fast.freeze(meta)


def test_a_compiled_model_that_computes_something_else_is_never_returned(pair, monkeypatch):
    """A planted miscompile (every output shifted by 1e-3 of its scale) fails the check against float64, and the
    compile's folder goes with it."""
    _, model = pair
    load = inductor.load
    folders = []

    def shifted(files, info):
        folders.append(files[inductor.ARTIFACT].parent)
        runner = load(files, info)
        return lambda x: [t + 1e-3 * t.abs().max() for t in runner(x)]

    monkeypatch.setattr(inductor, "load", shifted)
    with pytest.raises(frozen_module.FreezeError, match="inductor's logits is .* from float64 .* nothing was frozen"):
        cvt_fast.freeze(model, batch_size=1, image_size=(HEIGHT, WIDTH), engine="inductor")
    gc.collect()
    assert folders and not folders[0].exists()


def test_the_compile_uses_an_inductor_cache_of_this_cpu_target(monkeypatch):
    """torch 2.13's inductor cache is not keyed by the vector ISA: unless the user chose a folder, each target gets
    its own, and the environment is restored afterwards."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    target = this_cpu()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with inductor._inductor_cache_for(target):
        chosen = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert chosen.startswith(default_cache_dir() + "_cvt_fast_") and target.capability.lower() in chosen
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/of/mine")
    with inductor._inductor_cache_for(target):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/of/mine"


# ---- the command line ---------------------------------------------------------------------------------------


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cvt_fast", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint_and_images(pair, tmp_path_factory):
    """A checkpoint with its own preprocessing (32 px crops) and five images of assorted sizes."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("cli")
    pair[1].save_pretrained(folder / "ckpt")
    cvt_fast.image_processing.CvtImageProcessor(size=32, crop_pct=0.8).save_pretrained(folder / "ckpt")
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    for i, shape in enumerate([(40, 50, 3), (64, 33, 3), (37, 37, 3), (90, 60, 3), (45, 45, 3)]):
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    return folder


def test_export_pt2_then_classify_gives_the_checkpoint_s_answers(checkpoint_and_images):
    folder = checkpoint_and_images
    package = folder / "cvt.pt2"
    made = run_cli("export", "--model", str(folder / "ckpt"), "--output", str(package), "--batch-size", "2")
    assert made.returncode == 0, made.stderr
    assert "freezing on inductor for pixel_values (2, 3, 32, 32) float32" in made.stderr
    assert f"wrote {package}" in made.stdout and "checked against float64" in made.stdout
    assert frozen_module.read_package_info(package).processor["size"] == {"shortest_edge": 32}

    images = sorted(str(p) for p in (folder / "images").iterdir())  # 5 images: the last batch of 2 is padded
    eager = run_cli("classify", "--model", str(folder / "ckpt"), "--top-k", "3", *images)
    frozen = run_cli("classify", "--model", str(package), "--top-k", "3", *images)
    assert eager.returncode == 0 and frozen.returncode == 0, eager.stderr + frozen.stderr
    assert frozen.stdout == eager.stdout  # labels and scores to the printed 0.01%

    results = folder / "results.jsonl"
    run = run_cli("classify", "--model", str(package), "--input", str(folder / "images"), "--output", str(results),
                  "--workers", "0")  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line["path"] for line in lines] == images and all("labels" in line for line in lines)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--compile"], "is a package, frozen already"),
        (["--backend", "eager"], "runs a frozen model, which has no backend to choose"),
        (["--device", "cuda"], "runs a frozen model on the CPU"),
    ],
)
def test_classify_refuses_what_a_package_cannot_do(tmp_path, capsys, extra, message):
    from cvt_fast.cli import main

    assert main(["classify", "--model", str(tmp_path / "cvt.pt2"), *extra, "x.png"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
