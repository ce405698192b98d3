"""cvt_fast.freeze on every engine (ONNX Runtime and OpenVINO here; AOTInductor's own in test_frozen.py), tried as a
user would: each engine held to transformers' numbers, its .cvt package loaded in a fresh process without
transformers, engine="auto" keeping the fastest engine that passes its check, and every package this process cannot
run refused in one line before it loads, whatever CPU the suite runs on (records claiming more are written here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import cvt_fast
from cvt_fast.cpu_target import this_cpu
from cvt_fast.errors import CheckpointError, InputError, MissingDependencyError
from cvt_fast.frozen import freezing, package
from cvt_fast.frozen.engines import engine
from cvt_fast.timing import Timing

from support.helpers import FLOORS, TRAINABLE, harden_statistics_, model_pair, rel_err

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

HEIGHT, WIDTH, BATCH = 40, 36, 3
GRAPH_ENGINES = ["onnxruntime", "openvino"]  # the engines that build in seconds (inductor compiles for tens)


def needs(name):
    """Skip where the engine is not installed, or cannot run float32 in this process (OpenVINO under a oneDNN cap)."""
    reason = engine(name).missing() or engine(name).refuses(torch.float32, this_cpu())
    return pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")


@pytest.fixture(scope="module")
def pair():
    return harden_statistics_(model_pair(TRAINABLE | {"num_labels": 7}), torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def frozen_on(pair):
    """{engine: transformers' model frozen on it, float32}, built once."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = cvt_fast.freeze(pair[0], batch_size=BATCH, image_size=(HEIGHT, WIDTH), engine=name)
        return made[name]

    get.model = pair[1]
    return get


def images(count=BATCH, seed=0, dtype=torch.float32):
    return torch.randn(count, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def without_inductor(monkeypatch):
    """auto, without the engine that compiles for tens of seconds: the others are enough to choose between."""
    monkeypatch.setattr(engine("inductor"), "missing", lambda: "left out by this test")


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in GRAPH_ENGINES])
def test_each_engine_gives_transformers_numbers_for_any_smaller_batch(pair, frozen_on, name):
    frozen = frozen_on(name)
    x = images()
    with torch.no_grad():
        expected = pair[0](x).logits
    actual = frozen(x).logits
    assert frozen.engine == name and actual.dtype == torch.float32 and torch.isfinite(actual).all()
    assert rel_err(actual, expected) < 2e-5 and frozen.info.validation["logits"] < 2e-5
    # OpenVINO is also tried with the batch split across 2 streams (the suite runs on 2 threads or more)
    tried = [t.name for t in frozen.info.trials]
    assert tried == [name] if name == "onnxruntime" or torch.get_num_threads() < 2 else [name, f"{name} (2 streams)"]
    assert [t.status for t in frozen.info.trials].count("chosen") == 1
    for count in (1, 2):  # any batch up to 3 runs as it is (OpenVINO compiles each size on its first call)
        assert rel_err(frozen(x[:count]).logits, actual[:count]) < 1e-6
    assert frozen.info.dynamic_batch and "pixel_values (1 to 3, 3, 40, 36) float32" in repr(frozen)


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in GRAPH_ENGINES])
def test_a_cvt_package_runs_in_a_fresh_process_without_transformers(frozen_on, name, tmp_path):
    frozen = frozen_on(name)
    path = frozen.save(tmp_path / "cvt.cvt")
    with zipfile.ZipFile(path) as archive:  # the record and the engine's files, nothing else
        assert sorted(archive.namelist()) == sorted([package.RECORD, *engine(name).FILES])
    x = images(seed=7)
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import sys, json, torch
sys.modules["transformers"] = None  # any import of transformers fails
import cvt_fast
frozen = cvt_fast.load_frozen({str(path)!r})
torch.save(frozen(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "y.pt")!r})
print(json.dumps({{"engine": frozen.engine, "labels": frozen.config.num_labels}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"engine": name, "labels": 7}
    assert rel_err(torch.load(tmp_path / "y.pt"), frozen(x).logits) < 1e-6


@needs("openvino")
def test_openvino_streams_split_the_batch_with_the_same_answers(frozen_on, tmp_path):
    """The batch split across streams (each chunk its own request, the last padded) gives each image its answer."""
    path = frozen_on("openvino").save(tmp_path / "ov.cvt")
    one = cvt_fast.load_frozen(rewritten(path, tmp_path, settings={}))
    two = cvt_fast.load_frozen(rewritten(path, tmp_path, settings={"streams": 2}))
    x = images(seed=3)
    for count in (3, 2, 1):  # chunks of 2 and 1 padded to 2; 1 and 1; a single image on one stream
        assert rel_err(two(x[:count]).logits, one(x[:count]).logits) < 1e-6
    assert "with 2 streams" in repr(two) and "streams" not in repr(one)


@needs("openvino")
def test_openvino_bfloat16_base_model_within_the_rule(tmp_path):
    """A CvtModel (last hidden state and cls token), in OpenVINO's bfloat16, for any batch up to 3."""
    if engine("openvino").cannot_compute(torch.bfloat16, this_cpu()):
        pytest.skip("this CPU has no native bfloat16 for OpenVINO")
    _, model = harden_statistics_(model_pair(TRAINABLE, head=False, seed=1), torch.Generator().manual_seed(1))
    frozen = cvt_fast.freeze(model, batch_size=BATCH, image_size=(HEIGHT, WIDTH), dtype="bfloat16",
                             engine="openvino", dynamic_batch=True)  # fmt: skip
    x = images(seed=5)
    with torch.no_grad():
        exact = model.double()(x.double())
        eager = model.to(torch.bfloat16)(x.bfloat16())
        model.float()
    for count in (BATCH, 1):
        out = frozen(x[:count].bfloat16())
        for name in ("last_hidden_state", "cls_token_value"):
            got, reference = out[name], exact[name][:count]
            assert got.dtype == torch.bfloat16 and got.shape == reference.shape
            assert rel_err(got, reference) <= 2 * rel_err(eager[name][:count], reference) + FLOORS[torch.bfloat16]
    loaded = cvt_fast.load_frozen(frozen.save(tmp_path / "base.cvt"))
    assert torch.equal(loaded(x.bfloat16()).last_hidden_state, frozen(x.bfloat16()).last_hidden_state)


@needs("onnxruntime")
def test_an_engine_named_refuses_what_it_cannot_do_in_one_line(pair, monkeypatch):
    with pytest.raises(InputError, match="engine 'onnxruntime': bfloat16: .* float32 only"):
        cvt_fast.freeze(pair[1], engine="onnxruntime", dtype=torch.bfloat16)
    with pytest.raises(InputError, match="engine must be one of 'auto', 'inductor', 'onnxruntime', 'openvino'"):
        cvt_fast.freeze(pair[1], engine="tensorrt")
    monkeypatch.setattr(engine("onnxruntime"), "missing", lambda: "onnxruntime not installed (pip install ...)")
    with pytest.raises(MissingDependencyError, match="engine 'onnxruntime': onnxruntime not installed"):
        cvt_fast.freeze(pair[1], engine="onnxruntime")


def fake_timings(speeds: dict[str, float]):
    """interleaved(), answering with fixed seconds per call for each engine."""

    def interleaved(contenders, rounds, **_):
        return {name: Timing([1 / speeds[name]] * 3, [1 / speeds[name]] * rounds) for name in contenders}

    return interleaved


@needs("onnxruntime")
@needs("openvino")
@pytest.mark.parametrize("speeds, chosen", [
    ({"onnxruntime": 10, "openvino": 30, "openvino (2 streams)": 20}, "openvino"),
    ({"onnxruntime": 10, "openvino": 20, "openvino (2 streams)": 30}, "openvino (2 streams)"),
    ({"onnxruntime": 30, "openvino": 10, "openvino (2 streams)": 20}, "onnxruntime"),
])  # fmt: skip
def test_auto_keeps_the_fastest_engine_and_says_what_it_found(pair, monkeypatch, without_inductor, speeds, chosen):
    if torch.get_num_threads() < 2:
        pytest.skip("OpenVINO's streams are tried on 2 threads or more")
    monkeypatch.setattr(freezing, "interleaved", fake_timings(speeds))
    frozen = cvt_fast.freeze(pair[1], batch_size=2, image_size=(HEIGHT, WIDTH))
    trials = {t.name: t for t in frozen.info.trials}
    assert frozen.engine == chosen.split()[0] and frozen.info.settings == trials[chosen].settings
    assert trials["inductor"].status == "skipped" and trials["inductor"].reason == "left out by this test"
    assert [t.status for t in frozen.info.trials].count("chosen") == 1 and trials[chosen].status == "chosen"
    assert {t.status for name, t in trials.items() if name != chosen} == {"skipped", "slower"}
    assert all(trials[n].images_per_s == pytest.approx(2 * speeds[n]) for n in speeds)  # 2 images a call
    assert all(trials[n].errors["logits"] < 2e-5 and trials[n].build_s > 0 for n in speeds)
    assert "<- chosen" in trials[chosen].describe() and "skipped (left out" in trials["inductor"].describe()
    assert frozen.info.validation == trials[chosen].errors and frozen.info.compile_s > 0


@needs("onnxruntime")
@needs("openvino")
def test_auto_drops_an_engine_that_computes_something_else(pair, monkeypatch, without_inductor):
    """A planted miscompile on one engine (every output shifted by 1e-3 of its scale) fails its check: auto keeps the
    other and says why; with both wrong, nothing is frozen, and each reason is named."""
    ort = engine("onnxruntime")
    load = ort.load

    def shifted(files, info):
        runner = load(files, info)
        return lambda x: [t + 1e-3 * t.abs().max() for t in runner(x)]

    monkeypatch.setattr(ort, "load", shifted)
    frozen = cvt_fast.freeze(pair[1], image_size=(HEIGHT, WIDTH))  # batch 1: OpenVINO tried one way
    trials = {t.engine: t for t in frozen.info.trials}
    assert frozen.engine == "openvino" and trials["onnxruntime"].status == "failed"
    assert "from float64 (relative), over the" in trials["onnxruntime"].reason
    assert trials["openvino"].images_per_s is None  # nothing to choose between: not timed
    monkeypatch.setattr(engine("openvino"), "load", shifted)
    with pytest.raises(freezing.FreezeError, match="no engine could freeze this model: .*onnxruntime: failed .*"
                                                   "openvino: failed"):  # fmt: skip
        cvt_fast.freeze(pair[1], image_size=(HEIGHT, WIDTH))


@needs("openvino")
def test_a_build_that_fails_is_recorded_by_auto_and_raised_when_named(pair, monkeypatch, without_inductor):
    def broken(graphs, info, folder):
        raise RuntimeError("conversion\nfailed")

    monkeypatch.setattr(engine("openvino"), "build", broken)
    with pytest.raises(freezing.FreezeError, match=r"openvino could not freeze this model \(RuntimeError: conversion "
                                                   r"failed\)"):  # fmt: skip
        cvt_fast.freeze(pair[1], engine="openvino", image_size=(HEIGHT, WIDTH))
    if engine("onnxruntime").missing() is None:
        frozen = cvt_fast.freeze(pair[1], image_size=(HEIGHT, WIDTH))
        trials = {t.engine: t for t in frozen.info.trials}
        assert frozen.engine == "onnxruntime" and trials["openvino"].reason == "RuntimeError: conversion failed"


# ---- packages this process cannot run -------------------------------------------------------------------------


def rewritten(path, tmp_path, **changes):
    """A copy of a .cvt package whose record says something else."""
    copy = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}.cvt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == package.RECORD:
                record = json.loads(data)
                for key, value in changes.items():
                    record[key] = value(record[key]) if callable(value) else value
                data = json.dumps(record).encode()
            target.writestr(name, data)
    return copy


@needs("onnxruntime")
def test_a_package_this_process_cannot_run_is_refused_before_it_loads(frozen_on, tmp_path, monkeypatch):
    path = frozen_on("onnxruntime").save(tmp_path / "cvt.cvt")
    cases = [
        (dict(engine_version="0.0.1"), "was built and checked with onnxruntime 0.0.1; this is onnxruntime "),
        (dict(engine="tensorrt"), "runs on 'tensorrt', an engine this cvt_fast does not know"),
        (dict(format="cvt_fast.frozen/9"), "package format 'cvt_fast.frozen/9'"),
        (dict(dtype="float16"), "its cvt_fast record is damaged"),
    ]
    loaded = []
    monkeypatch.setattr(engine("onnxruntime"), "load", lambda files, info: loaded.append(files))
    for changes, message in cases:
        with pytest.raises(CheckpointError, match=message) as refusal:
            cvt_fast.load_frozen(rewritten(path, tmp_path, **changes))
        assert "\n" not in str(refusal.value)
    monkeypatch.setattr(engine("onnxruntime"), "version", lambda: None)
    with pytest.raises(package.PackageMismatchError, match=r"runs on onnxruntime, which is not installed here \(pip"):
        cvt_fast.load_frozen(path)
    assert not loaded


@needs("openvino")
def test_a_bfloat16_openvino_package_needs_a_cpu_with_native_bfloat16(pair, tmp_path, monkeypatch):
    """Written for a CPU with AVX-512 BF16 (the record says so), refused where this CPU has none: on any machine."""
    path = cvt_fast.freeze(pair[1], image_size=(HEIGHT, WIDTH), engine="openvino").save(tmp_path / "f32.cvt")
    claimed = rewritten(path, tmp_path, dtype="bfloat16")
    here = this_cpu()
    without = type(here)(here.machine, here.capability, tuple(f for f in here.flags if "bf16" not in f), False, "cpu")
    monkeypatch.setattr(package, "this_cpu", lambda: without)
    with pytest.raises(package.PackageMismatchError, match="cannot run on this CPU: OpenVINO computes bfloat16 only"):
        cvt_fast.load_frozen(claimed)
    cvt_fast.load_frozen(path)  # its float32 original runs there


@needs("openvino")
def test_openvino_is_kept_out_of_a_process_whose_onednn_is_capped_below_the_cpu(frozen_on, tmp_path, monkeypatch):
    """OpenVINO crashed (a segmentation fault) under ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU: such a process skips
    it when freezing and refuses its packages, before any of it loads. Written for an AVX-512 CPU, on any CPU."""
    path = frozen_on("openvino").save(tmp_path / "ov.cvt")
    here = this_cpu()
    avx512 = type(here)(here.machine, "AVX512", tuple(sorted({*here.flags, "avx512f"})), False, "an AVX-512 CPU")
    monkeypatch.setattr(package, "this_cpu", lambda: avx512)
    monkeypatch.setattr(freezing, "this_cpu", lambda: avx512)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    loaded = []
    monkeypatch.setattr(engine("openvino"), "load", lambda files, info: loaded.append(files))
    with pytest.raises(package.PackageMismatchError, match="ONEDNN_MAX_CPU_ISA=AVX2 on a CPU with AVX-512"):
        cvt_fast.load_frozen(path)
    with pytest.raises(InputError, match="engine 'openvino': ONEDNN_MAX_CPU_ISA=AVX2"):
        cvt_fast.freeze(frozen_on.model, image_size=(HEIGHT, WIDTH), engine="openvino")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # AVX-512 kept: float32 runs, bfloat16 is refused
    assert engine("openvino").cannot_compute(torch.float32, avx512) is None
    bf16 = type(here)(here.machine, "AVX512", tuple(sorted({*avx512.flags, "avx512_bf16"})), True, "cpu")
    assert "which ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps from it" in engine("openvino").cannot_compute(
        torch.bfloat16, bf16
    )
    assert not loaded
    from cvt_fast import cpu_target
    from cvt_fast.tools import benchmark

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setattr(cpu_target, "this_cpu", lambda: avx512)
    for name in ("cvt_fast-frozen-openvino", "openvino-transformers"):  # the benchmark leaves them out there too
        assert not benchmark._applies(name, torch.float32, torch.device("cpu"))


@needs("onnxruntime")
def test_damaged_and_truncated_packages_get_one_line(frozen_on, tmp_path):
    path = frozen_on("onnxruntime").save(tmp_path / "cvt.cvt")
    data = path.read_bytes()
    (tmp_path / "cut.cvt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable package .*an incomplete copy or download"):
        cvt_fast.load_frozen(tmp_path / "cut.cvt")
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.onnx")
    damaged = bytearray(data)
    middle = info.header_offset + 200 + info.file_size // 2
    damaged[middle : middle + 64] = bytes(64)  # the graph's bytes zeroed: its CRC no longer matches
    (tmp_path / "damaged.cvt").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="damaged .*CRC"):
        cvt_fast.load_frozen(tmp_path / "damaged.cvt")


@needs("onnxruntime")
def test_save_takes_cvt_for_any_engine_and_pt2_for_inductor_alone(frozen_on, tmp_path):
    frozen = frozen_on("onnxruntime")
    with pytest.raises(InputError, match=r"a \.pt2 file holds inductor's packages only.*save it as cvt\.cvt"):
        frozen.save(tmp_path / "cvt.pt2")
    with pytest.raises(InputError, match=r"should end in \.cvt .* or \.pt2"):
        frozen.save(tmp_path / "cvt.onnx")
    assert not list(tmp_path.iterdir())


# ---- the preprocessing a package records --------------------------------------------------------------------


@needs("onnxruntime")
def test_a_package_records_its_checkpoint_s_preprocessing_however_it_was_made(pair, tmp_path):
    from cvt_fast.image_processing import CvtImageProcessor

    folder = tmp_path / "ckpt"
    pair[1].save_pretrained(folder)
    CvtImageProcessor(size=40, crop_pct=0.8).save_pretrained(folder)
    for model in (cvt_fast.CvtForImageClassification.from_pretrained(folder),
                  transformers.CvtForImageClassification.from_pretrained(folder)):  # fmt: skip
        info = cvt_fast.freeze(model, image_size=40, engine="onnxruntime").info
        assert info.processor_source == "checkpoint" and info.processor["crop_pct"] == 0.8
    given = CvtImageProcessor(size=40, crop_pct=0.5)
    info = cvt_fast.freeze(pair[1], image_size=40, engine="onnxruntime", processor=given).info
    assert info.processor_source == "given" and info.processor["crop_pct"] == 0.5
    info = cvt_fast.freeze(pair[1], image_size=40, engine="onnxruntime").info  # a model of no checkpoint
    assert info.processor_source == "default" and info.processor["size"] == {"shortest_edge": 40}


def test_the_command_line_knows_the_library_s_engines_and_packages():
    from cvt_fast.cli import export, model_source

    assert export.ENGINES == freezing.ENGINE_CHOICES and model_source.PACKAGE_SUFFIXES == package.SUFFIXES


# ---- the command line ---------------------------------------------------------------------------------------


def run_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "cvt_fast", *args], capture_output=True, text=True, timeout=900,
                          env=env)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(pair, tmp_path_factory):
    """A checkpoint with its own preprocessing (32 px crops), and a labelled folder of 5 images in two classes."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("cli")
    pair[1].save_pretrained(folder / "ckpt")
    cvt_fast.image_processing.CvtImageProcessor(size=32, crop_pct=0.8).save_pretrained(folder / "ckpt")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(40, 50, 3), (64, 33, 3), (37, 37, 3), (90, 60, 3), (45, 45, 3)]):
        label = pair[1].config.id2label[i % 2]
        (folder / "images" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(folder / "images" / label / f"{i}.png")
    return folder


@pytest.mark.slow
def test_export_auto_then_classify_and_evaluate_the_package(checkpoint):
    """The whole way a user takes: export on the fastest engine here (every engine built, checked and timed, each one
    reported), then classify and evaluate with the package: the checkpoint's answers."""
    package_path = checkpoint / "cvt.cvt"
    made = run_cli("export", "--model", str(checkpoint / "ckpt"), "--output", str(package_path), "--batch-size", "2")
    assert made.returncode == 0, made.stderr
    info = cvt_fast.frozen.read_package_info(package_path)
    tried = [name for name in ("inductor", *GRAPH_ENGINES) if engine(name).missing() is None]
    assert [line.split(":")[0].strip() for line in made.stdout.splitlines()[1 : 1 + len(tried)]] == tried
    assert f"{info.engine}: " in made.stdout and "<- chosen" in made.stdout and f"wrote {package_path}" in made.stdout
    assert info.processor["size"] == {"shortest_edge": 32} and info.processor_source == "checkpoint"

    images = sorted(str(p) for p in (checkpoint / "images").rglob("*.png"))
    eager = run_cli("classify", "--model", str(checkpoint / "ckpt"), "--top-k", "3", *images)
    frozen = run_cli("classify", "--model", str(package_path), "--top-k", "3", *images)
    assert eager.returncode == 0 and frozen.returncode == 0, eager.stderr + frozen.stderr
    assert frozen.stdout == eager.stdout  # labels and scores to the printed 0.01%

    scored = {}
    for model in (str(checkpoint / "ckpt"), str(package_path)):
        out = checkpoint / f"results-{len(scored)}.jsonl"
        result = run_cli("evaluate", "--model", model, "--input", str(checkpoint / "images"), "--output", str(out),
                         "--workers", "0", "--metrics", str(out.with_suffix(".json")))  # fmt: skip
        assert result.returncode == 0, result.stderr
        scored[model] = json.loads(out.with_suffix(".json").read_text())
    assert scored[str(package_path)]["top1"] == scored[str(checkpoint / "ckpt")]["top1"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--output", "cvt.pt2", "--engine", "openvino"], "is a .pt2 file, which holds inductor's packages only"),
        (["--output", "cvt.cvt", "--attention", "onnx"], "only for an ONNX file (.onnx)"),
        (["--output", "cvt.onnx", "--engine", "openvino"], "only for a package (.cvt, .pt2)"),
        (["--output", "cvt.zip"], "ends in .zip; expected .onnx an ONNX file; .cvt a frozen package"),
        (["--output", "cvt.cvt", "--image-size", "1", "2", "3"], "one size or a height and a width"),
    ],
)
def test_export_refuses_what_its_output_cannot_hold(tmp_path, capsys, monkeypatch, extra, message):
    from cvt_fast.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", "ckpt", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
