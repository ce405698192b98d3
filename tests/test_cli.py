"""The command line, run as a user would: a subprocess on real files; and, faster, main() in this process for the
many ways a user can get an argument or a file wrong, each of which must end in one line and exit status 2."""

import builtins
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cvt_fast
from cvt_fast import cli
from cvt_fast.testing import randomize_
from cvt_fast.tools import benchmark, reporting

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.integration

LABELS = {0: "tabby cat", 1: "golden retriever", 2: "teapot", 3: "volcano"}


def run_cli(*args, env=None, cwd=None):
    """As a user runs it, from a directory of their own."""
    return subprocess.run(
        [sys.executable, "-m", "cvt_fast", *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd
    )


def test_classify_prints_the_top_labels(tmp_path):
    config = transformers.CvtConfig(depth=[1, 2, 3], embed_dim=[16, 24, 32], num_heads=[1, 2, 2], id2label=LABELS)
    model = randomize_(transformers.CvtForImageClassification(config), torch.Generator().manual_seed(3)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    processor = transformers.ConvNextImageProcessor(
        size=224, crop_pct=0.875, resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )
    processor.save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    paths = []
    for i, shape in enumerate([(240, 320, 3), (300, 200, 3)]):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(paths[-1])

    result = run_cli("classify", "--model", str(tmp_path / "ckpt"), "--top-k", "2", *map(str, paths), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split(str(paths[1]))
    for path, block in zip(paths, blocks, strict=True):
        with torch.no_grad():
            logits = model(**processor(Image.open(path), return_tensors="pt")).logits[0]
        top_two = [LABELS[i] for i in logits.topk(2).indices.tolist()]
        lines = [line for line in block.splitlines() if "%" in line]
        assert [line.split("%", 1)[1].strip() for line in lines] == top_two


def test_classify_reports_a_missing_checkpoint(tmp_path):
    result = run_cli("classify", "--model", str(tmp_path / "nothing-here"), "x.png", cwd=tmp_path)
    assert result.returncode == 2 and "not a checkpoint directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_short_run_writes_records(tmp_path):
    config_path = tmp_path / "tiny.json"
    config_path.write_text(
        json.dumps(
            {
                "depth": [1, 2],
                "embed_dim": [16, 32],
                "num_heads": [1, 2],
                "cls_token": [False, True],
                "model_type": "cvt",
            }
        )
    )
    out = tmp_path / "out"
    result = run_cli(
        "bench", "--models", str(config_path), "--sizes", "48", "--batches", "2", "--rounds", "2", "--out", str(out),
        "--implementations", "transformers-eager", "cvt_fast-eager", "--dtypes", "float32", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = result.stdout.split("cvt_fast's fastest: ", 1)[1]  # the case's summary line
    assert summary.startswith("cvt_fast-eager, ") and "without cvt_fast: transformers-eager, " in summary
    # stderr is a pipe here, as in CI and GPU sessions: a plain progress line per step, not a terminal's status line
    progress = [line for line in result.stderr.splitlines() if line.startswith("[1/1, ")]
    assert [line.split("] ", 1)[1] for line in progress] == [
        f"{config_path} 48px batch 2 float32: references",
        f"{config_path} 48px batch 2 float32: preparing transformers-eager",
        f"{config_path} 48px batch 2 float32: preparing cvt_fast-eager",
        f"{config_path} 48px batch 2 float32: round 1/2",
        f"{config_path} 48px batch 2 float32: round 2/2",
    ]
    assert "\r" not in result.stderr and "\033" not in result.stderr
    written = f"results written to {out / 'bench.jsonl'}, {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}"
    assert written in result.stdout
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")
    records = json.loads((tmp_path / "out" / "bench.json").read_text())
    # the same records, appended one by one while the run went on
    assert [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()] == records
    assert {r["implementation"] for r in records} == {"transformers-eager", "cvt_fast-eager"}
    for r in records:
        assert r["images_per_s"] > 0 and r["max_err"] < 1e-4 and r["batch"] == 2 and r["image_size"] == 48
        assert r["rule"] == "pass" and r["rel_err"] <= 2e-5 and r["spread"] >= 0
    assert "| cvt_fast-eager |" in (tmp_path / "out" / "bench.md").read_text()


def test_bench_measures_configs_transformers_cannot_run(tmp_path):
    """A stage no deeper than its index crashes transformers' CvT; cvt_fast runs it, so the benchmark measures it,
    its errors against cvt_fast's own float32 eager model, and says so."""
    from cvt_fast.tools.benchmark import bench_case

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"depth": [1, 1], "embed_dim": [16, 32], "num_heads": [1, 2], "model_type": "cvt"}))
    implementations = ["transformers-eager", "cvt_fast-eager"]
    records = bench_case(str(config), 32, 2, "float32", implementations, torch.device("cpu"), 1, lambda _: None)
    theirs, ours = records
    assert theirs.error.startswith("IndexError") and theirs.images_per_s is None
    assert ours.images_per_s > 0 and ours.max_err == 0.0  # the same eager model in the same dtype
    assert "transformers cannot run this config" in ours.note


def test_bench_refuses_to_time_kernels_under_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = run_cli("bench", "--implementations", "cvt_fast-triton", "--device", "cpu", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "timings of kernels under the Triton interpreter mean nothing" in result.stderr
    assert "Traceback" not in result.stderr


# ---- one line and exit status 2 for whatever the user got wrong ----------------------------------------------

LOADING_CALLED = "the model was loaded, or the benchmark run, before the arguments were checked"


def cli_main(capsys, *argv):
    """main() in this process: (exit status, stdout, stderr lines)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit:  # argparse's errors
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small classifier checkpoint with its preprocessor config, and two readable images."""
    root = tmp_path_factory.mktemp("classify")
    config = cvt_fast.CvtConfig(depth=[1, 1], embed_dim=[8, 16], num_heads=[1, 2], cls_token=[False, True])
    config.update(id2label=LABELS)
    model = randomize_(cvt_fast.CvtForImageClassification(config), torch.Generator().manual_seed(8)).eval()
    model.save_pretrained(root / "ckpt")
    from cvt_fast.image_processing import CvtImageProcessor

    CvtImageProcessor(size=64).save_pretrained(root / "ckpt")
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture
def ckpt_copy(checkpoint, tmp_path):
    """A copy of the checkpoint folder to damage."""
    import shutil

    return shutil.copytree(checkpoint / "ckpt", tmp_path / "ckpt")


def test_classify_in_process_prints_the_top_labels(capsys, checkpoint):
    status, out, err = cli_main(capsys, "classify", "--model", str(checkpoint / "ckpt"), str(checkpoint / "a.png"))
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == str(checkpoint / "a.png") and len(lines) == 5  # the image, then its top labels (4 classes)
    assert sorted(line.split("%", 1)[1].strip() for line in lines[1:]) == sorted(LABELS.values())


@pytest.mark.parametrize("dataset", [False, True], ids=["image files", "--input"])
def test_classify_runs_float32_unless_told_even_for_a_half_precision_checkpoint(
    capsys, checkpoint, tmp_path, monkeypatch, dataset
):
    """As transformers' from_pretrained, whose default is float32: --dtype is what changes it, not the file."""
    half = cvt_fast.CvtForImageClassification.from_pretrained(checkpoint / "ckpt").half()
    half.save_pretrained(tmp_path / "ckpt")
    shutil.copy(checkpoint / "ckpt" / "preprocessor_config.json", tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["dtype"] == "float16"
    ran = []
    forward = cvt_fast.CvtForImageClassification.forward
    monkeypatch.setattr(
        cvt_fast.CvtForImageClassification,
        "forward",
        lambda self, *a, **k: ran.append(self.dtype) or forward(self, *a, **k),
    )
    images = (
        ["--input", checkpoint, "--output", tmp_path / "r.jsonl", "--workers", "0"]
        if dataset
        else [checkpoint / "a.png"]
    )
    for extra, dtype in (([], torch.float32), (["--dtype", "bfloat16"], torch.bfloat16)):
        ran.clear()
        status, _, err = cli_main(
            capsys,
            "classify",
            "--model",
            str(tmp_path / "ckpt"),
            *map(str, images),
            *extra,
            *(["--overwrite"] if dataset else []),
        )
        assert status == 0, err
        assert ran and set(ran) == {dtype}


def test_a_folder_without_config_is_refused_first_without_notes_about_it(capsys, checkpoint, ckpt_copy):
    """No config.json and no preprocessor_config.json: the one line says what is missing and what a checkpoint
    folder holds, before (and instead of) any note about its preprocessing."""
    (ckpt_copy / "config.json").unlink()
    (ckpt_copy / "preprocessor_config.json").unlink(missing_ok=True)
    for extra in ([str(checkpoint / "a.png")], ["--input", str(checkpoint), "--output", str(ckpt_copy / "r.jsonl")]):
        status, out, err = cli_main(capsys, "classify", "--model", str(ckpt_copy), *extra)
        assert status == 2 and out == "" and len(err) == 1, err
        assert err[0].startswith(f"cvt-fast classify: argument --model: {ckpt_copy} has no config.json; expected")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
         "{d}/model.safetensors: not a readable safetensors file (Error while deserializing header: "),
        (lambda d: (d / "model.safetensors").write_bytes(b""),
         "{d}/model.safetensors: not a readable safetensors file (Error while deserializing header: header too small"),
        (lambda d: (d / "config.json").write_text("{'depth': [1, 1]}"),
         "{d}/config.json: is not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
        (lambda d: (d / "config.json").write_text(json.dumps({"depth": [1, 1], "mlp_ratio": [-1.0, 4.0]})),
         "{d}/config.json: stage 0: mlp_ratio must be at least 0, got -1.0"),
        (lambda d: (d / "config.json").write_text(json.dumps({"depth": [1, "2"]})),
         "{d}/config.json: stage 1: depth must be an integer, got str '2'"),
        (lambda d: (d / "config.json").write_text(json.dumps({"depth": [1, 1], "drop_rate": [0.0, 2.0]})),
         "{d}/config.json: stage 1: drop_rate must be at most 1, got 2.0"),
        (lambda d: (d / "preprocessor_config.json").write_text(json.dumps({"size": 64, "image_std": [0.2, 0, 0.2]})),
         "{d}/preprocessor_config.json: image_std must not hold 0 (normalisation divides by it), got [0.2, 0, 0.2]"),
        (lambda d: (d / "preprocessor_config.json").write_text(json.dumps({"size": 4})),
         "{a}: after preprocessing, image of 4x4 pixels is smaller than the model's total stride: height and width"),
        (lambda d: (d / "config.json").unlink(),
         "argument --model: {d} has no config.json; expected a checkpoint folder as save_pretrained writes it"),
        (lambda d: (d / "model.safetensors").unlink(),
         "no weights in {d}: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or"),
    ],
    ids=["truncated weights", "empty weights", "config not JSON", "negative mlp_ratio", "depth a string",
         "drop_rate 2", "zero image_std", "preprocessor size too small", "no config.json", "no weights"],
)  # fmt: skip
def test_a_damaged_checkpoint_gets_one_line(capsys, checkpoint, ckpt_copy, damage, expected):
    damage(ckpt_copy)
    status, out, err = cli_main(capsys, "classify", "--model", str(ckpt_copy), str(checkpoint / "a.png"))
    assert status == 2 and out == ""
    assert len(err) == 1 and err[0].startswith(
        "cvt-fast classify: " + expected.format(d=ckpt_copy, a=checkpoint / "a.png")
    )


def test_a_malicious_bin_gets_one_line_without_torchs_advice(capsys, checkpoint, ckpt_copy, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:  # unpickled, it would create `marker`
        def __reduce__(self):
            return (builtins.exec, (f"open({str(marker)!r}, 'w').close()",))

    (ckpt_copy / "model.safetensors").unlink()
    torch.save({"x": Payload()}, ckpt_copy / "pytorch_model.bin")
    status, out, err = cli_main(capsys, "classify", "--model", str(ckpt_copy), str(checkpoint / "a.png"))
    assert status == 2 and out == "" and not marker.exists()
    assert err == [
        f"cvt-fast classify: {ckpt_copy / 'pytorch_model.bin'}: refused, it holds Python objects and not only tensors "
        "(Unsupported global: GLOBAL exec was not an allowed global by default); cvt_fast reads .bin "
        "checkpoints with torch.load(weights_only=True), which never runs code from a file"
    ]
    torch.load(ckpt_copy / "pytorch_model.bin", weights_only=False)  # the payload is live: read unsafely, it runs
    assert marker.exists()


def test_a_checkpoint_that_does_not_fit_names_the_keys_without_a_python_argument(capsys, checkpoint, ckpt_copy):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(ckpt_copy / "model.safetensors"))
    del weights["classifier.bias"]
    save_file(weights, str(ckpt_copy / "model.safetensors"))
    status, _, err = cli_main(capsys, "classify", "--model", str(ckpt_copy), str(checkpoint / "a.png"))
    assert status == 2
    assert err == [
        f"cvt-fast classify: checkpoint {ckpt_copy} does not fit CvtForImageClassification: missing keys "
        "(classifier.bias)"
    ]  # no "pass strict=False": the command has no such option


def test_every_unreadable_image_is_named_before_the_model_loads(capsys, monkeypatch, checkpoint, tmp_path):
    monkeypatch.setattr(
        cvt_fast.CvtForImageClassification, "from_pretrained", lambda *a, **k: pytest.fail(LOADING_CALLED)
    )
    (tmp_path / "notes.txt").write_text("not an image")
    png = (checkpoint / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    paths = [tmp_path / "missing.png", checkpoint / "a.png", tmp_path, tmp_path / "notes.txt", tmp_path / "cut.png"]
    status, out, err = cli_main(capsys, "classify", "--model", str(checkpoint / "ckpt"), *map(str, paths))
    assert status == 2 and out == ""
    assert err[0] == f"cvt-fast classify: {tmp_path / 'missing.png'}: no such file"
    assert err[1] == f"cvt-fast classify: {tmp_path}: a folder, not an image file"
    assert (
        err[2]
        == f"cvt-fast classify: {tmp_path / 'notes.txt'}: not an image file (Pillow does not recognise its format)"
    )
    assert err[3].startswith(f"cvt-fast classify: {tmp_path / 'cut.png'}: cannot be decoded (")
    assert len(err) == 4


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--top-k", "-1"], "argument --top-k: expected a number of at least 1, got -1 (see cvt-fast classify --help)"),
        (["--top-k", "0"], "argument --top-k: expected a number of at least 1, got 0"),
        (["--top-k", "three"], "argument --top-k: expected a whole number, got 'three'"),
        (["--device", "gpu"], "argument --device: device 'gpu' is not a device name (expected e.g. 'cpu', 'cuda'"),
        (["--device", "cuda:99"], "argument --device: device 'cuda:99' is not available on this machine ("),
        (["--backend", "fast"], "argument --backend: invalid choice: 'fast' (choose from 'auto', 'eager', 'triton')"),
        (["--model", ""], "an empty name is not a checkpoint (expected a save_pretrained folder or hub id)"),
        (["--model", "./ckpt_typo"], "'./ckpt_typo' is not a checkpoint directory: there is no such folder"),
    ],
)
def test_classify_arguments_get_one_line(capsys, monkeypatch, checkpoint, argv, expected):
    monkeypatch.setattr(
        cvt_fast.CvtForImageClassification, "from_pretrained", lambda *a, **k: pytest.fail(LOADING_CALLED)
    )
    base = {"--model": str(checkpoint / "ckpt")}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    status, out, err = cli_main(capsys, "classify", *[x for kv in base.items() for x in kv], str(checkpoint / "a.png"))
    assert status == 2 and out == ""
    assert len(err) == 1 and err[0].startswith(f"cvt-fast classify: {expected}"), err


def test_a_bad_backend_in_the_environment_gets_one_line(capsys, monkeypatch, checkpoint):
    monkeypatch.setenv("CVT_FAST_BACKEND", "fastest")
    status, _, err = cli_main(capsys, "classify", "--model", str(checkpoint / "ckpt"), str(checkpoint / "a.png"))
    assert status == 2
    assert err == [
        "cvt-fast classify: environment variable CVT_FAST_BACKEND is 'fastest'; expected one of ('auto', 'eager', "
        "'triton')"
    ]


def test_a_name_neither_a_folder_nor_on_the_hub(capsys, monkeypatch, checkpoint, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    status, _, err = cli_main(capsys, "classify", "--model", "ckpt_typo", str(checkpoint / "a.png"))
    assert status == 2
    assert err == [
        f"cvt-fast classify: 'ckpt_typo' is not a checkpoint directory (there is no folder {tmp_path / 'ckpt_typo'}) "
        "and could not be fetched from the Hugging Face Hub either (outgoing traffic has been disabled)"
    ]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--implementations", "bogus"], "argument --implementations: unknown 'bogus'; the implementations are "
         "transformers-eager, transformers-eager-cast, transformers-compile, onnxruntime-transformers, "),
        (["--rounds", "0"], "argument --rounds: expected a number of at least 1, got 0 (see cvt-fast bench --help)"),
        (["--batches", "8", "0"], "argument --batches: expected a number of at least 1, got 0"),
        (["--sizes", "-224"], "argument --sizes: expected a number of at least 1, got -224"),
        (["--sizes", "8"], "argument --sizes: 8 does not suit cvt-13: image of 8x8 pixels is smaller than the "
         "model's total stride"),
        (["--models", "cvt-99"], "argument --models: unknown preset 'cvt-99'; the presets are cvt-13, cvt-13-384, "
         "cvt-21, cvt-21-384, cvt-w24, cvt-w24-384 (or give the path of a config.json)"),
        (["--dtypes", "float8"], "argument --dtypes: invalid choice: 'float8'"),
        (["--device", "cuda:99"], "argument --device: device 'cuda:99' is not available on this machine"),
        (["--device", "tpu"], "argument --device: device 'tpu' is not a device name"),
    ],
)  # fmt: skip
def test_bench_arguments_get_one_line(capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail(LOADING_CALLED))
    status, out, err = cli_main(capsys, "bench", *argv)
    assert status == 2 and out == ""
    assert len(err) == 1 and err[0].startswith(f"cvt-fast bench: {expected}"), err


def test_bench_names_a_bad_config_file_and_an_output_folder_it_cannot_make(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail(LOADING_CALLED))
    (tmp_path / "tiny.json").write_text('{"depth": [1, 1], "num_heads": [1, 0]}')
    status, _, err = cli_main(capsys, "bench", "--models", str(tmp_path / "tiny.json"))
    assert status == 2 and err == [
        f"cvt-fast bench: {tmp_path / 'tiny.json'}: stage 1: num_heads must be at least 1, got 0"
    ]
    (tmp_path / "taken").write_text("a file where the results folder would go")
    status, _, err = cli_main(capsys, "bench", "--out", str(tmp_path / "taken" / "results"))
    assert status == 2 and len(err) == 1
    assert err[0].startswith(
        f"cvt-fast bench: argument --out: {tmp_path / 'taken' / 'results'} cannot be made a folder"
    )


def test_help_and_argument_errors_do_not_import_torch():
    """What makes `cvt-fast --help` answer at once (about 1 s of torch import before, 7 s on a slow disk)."""
    code = """
import sys
from cvt_fast.cli import main
for argv in (["--help"], ["bench", "--help"], ["classify", "--help"], ["bench", "--rounds", "0"], ["nonsense"]):
    try:
        main(argv)
    except SystemExit:
        pass
print("torch imported:", "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "torch imported: False"


def test_progress_is_a_plain_line_per_step_off_a_terminal():
    stream = io.StringIO()  # not a terminal, like a log file or a pipe
    progress = reporting.progress_printer(total=3, stream=stream)
    progress.state["case"] = 2
    progress("cvt-13 224px batch 8 float32: references")
    progress("cvt-13 224px batch 8 float32: round 1/5")
    progress.clear()
    assert stream.getvalue().splitlines() == [
        "[2/3, 0s] cvt-13 224px batch 8 float32: references",
        "[2/3, 0s] cvt-13 224px batch 8 float32: round 1/5",
    ]


def test_results_are_announced_and_a_missing_matplotlib_said(tmp_path, capsys, monkeypatch):
    record = benchmark.Record("cpu", "2", None, None, "cvt-13", 224, 1, "float32", "cvt_fast-eager", 10.0, 100.0,
                              None, 1e-6, 1e-7)  # fmt: skip
    monkeypatch.setattr(benchmark, "bench_case", lambda *a, **k: [record])
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    benchmark.run(["cvt-13"], [224], [1], ["float32"], ["cvt_fast-eager"], torch.device("cpu"), 1, tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        f"results written to {tmp_path / 'bench.jsonl'}, {tmp_path / 'bench.json'}, {tmp_path / 'bench.md'}",
        f"no {tmp_path / 'bench.png'}: the plot needs matplotlib (pip install matplotlib)",
    ]
    assert json.loads((tmp_path / "bench.json").read_text())[0]["images_per_s"] == 10.0


def test_the_benchmark_refuses_an_unknown_implementation():
    with pytest.raises(ValueError, match=r"unknown implementations \['cvt_fast-fast'\]"):
        benchmark.run(["cvt-13"], [224], [1], ["float32"], ["cvt_fast-fast"], torch.device("cpu"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["classify", "--model", "{ckpt}", "--top-k", "-1", "{image}"], "argument --top-k: expected a number of at "
         "least 1, got -1"),
        (["classify", "--model", "{damaged}", "{image}"], "{damaged}/config.json: is not valid JSON"),
        (["bench", "--implementations", "bogus"], "argument --implementations: unknown 'bogus'"),
        (["bench", "--models", "cvt-99"], "argument --models: unknown preset 'cvt-99'"),
    ],
)  # fmt: skip
def test_as_a_user_sees_it(checkpoint, ckpt_copy, tmp_path, args, expected):
    """The same, end to end: a fresh interpreter, stderr as the user reads it, no traceback."""
    (ckpt_copy / "config.json").write_text("{not json")
    fill = {"ckpt": checkpoint / "ckpt", "image": checkpoint / "a.png", "damaged": ckpt_copy}
    result = run_cli(*[a.format(**fill) for a in args], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]]
    assert result.stderr.startswith(f"cvt-fast {args[0]}: {expected.format(**fill)}")


def test_classify_device_cuda_without_cuda(capsys, checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, _, err = cli_main(capsys, "classify", "--model", str(checkpoint / "ckpt"), "--device", "cuda", "x.png")
    assert status == 2
    assert err == [
        "cvt-fast classify: argument --device: device 'cuda' is not available on this machine (Torch not compiled "
        "with CUDA enabled)"
    ]


def test_every_module_is_reachable_from_the_package():
    """cvt_fast imports its modules on first use: a new module must be listed there to stay reachable."""
    from pathlib import Path

    package = Path(cvt_fast.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__"}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}  # subpackages (cli, ops, tools)
    assert set(cvt_fast._SUBMODULES) == modules | {"kernels"}
    assert sorted(cvt_fast.__all__) == sorted(cvt_fast._EXPORTS)
    # The names imported for type checkers are the same names, from the same modules.
    import ast

    tree = ast.parse((package / "__init__.py").read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                   "TYPE_CHECKING")  # fmt: skip
    imported = {alias.name: "." + node.module for node in guarded.body for alias in node.names}
    assert imported == cvt_fast._EXPORTS


def test_classify_form_errors_answer_without_importing_torch():
    """Which form of classify (image files, or --input with --output) is settled before torch is imported."""
    code = """
import sys
from cvt_fast.cli import main
statuses = [main(argv) for argv in (["classify", "--model", "m"], ["classify", "--model", "m", "--input", "d"],
                                    ["classify", "--model", "m", "--workers", "2", "a.png"])]
print("statuses:", statuses, "torch imported:", "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "statuses: [2, 2, 2] torch imported: False", result.stderr
    assert result.stderr.splitlines() == [
        "cvt-fast classify: give image files, or --input FOLDER_OR_LIST with --output FILE (see cvt-fast classify "
        "--help)",
        "cvt-fast classify: argument --input: needs --output, the JSON-lines file for the results (e.g. results.jsonl)",
        "cvt-fast classify: argument --workers: only with --input (a folder, or a file listing images)",
    ]


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_image_files_under_torchrun_are_refused_once(capsys, monkeypatch, checkpoint, rank, printed):
    """Every process of a torchrun would print every image's labels: refused, and said by rank 0 only."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    status, out, err = cli_main(capsys, "classify", "--model", str(checkpoint / "ckpt"), str(checkpoint / "a.png"))
    assert status == 2 and out == ""
    expected = [
        "cvt-fast classify: under torchrun give --input and --output: image files given as arguments would be "
        "classified and printed by every process"
    ]
    assert err == (expected if printed else [])


def test_classify_image_files_in_half_precision(capsys, checkpoint):
    """--dtype applies to the image-file form too: bfloat16 weights and inputs, the same top label as float32."""
    args = ["classify", "--model", str(checkpoint / "ckpt"), "--top-k", "1", str(checkpoint / "a.png")]
    status, full, _ = cli_main(capsys, *args)
    status_half, half, err = cli_main(capsys, *args, "--dtype", "bfloat16")
    assert status == status_half == 0, err
    assert half.splitlines()[1].split("%", 1)[1] == full.splitlines()[1].split("%", 1)[1]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["classify", "--model", "m", "--batchsize", "4", "a.png"],
         "cvt-fast classify: unrecognized arguments: --batchsize (did you mean --batch-size?)"),
        (["export", "--model", "m", "--output", "x.pt2", "--image_size=224"],
         "cvt-fast export: unrecognized arguments: --image_size=224 (did you mean --image-size?)"),
        (["bench", "--frobnicate"], "cvt-fast bench: unrecognized arguments: --frobnicate (see cvt-fast bench --help)"),
    ],
)  # fmt: skip
def test_a_mistyped_option_is_named_by_its_command_with_what_was_meant(capsys, argv, expected):
    from cvt_fast.cli import main

    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith(expected), err
