"""`cvt-fast convert`: an original CvT checkpoint (microsoft/CvT's .pth and YAML spec) into transformers' format, which
cvt_fast loads with the same answers and transformers loads key for key; refusals in one line, nothing half-written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import cli_main
from test_original import pixels

from cvt_fast import CvtForImageClassification
from cvt_fast.testing import randomize_

from support.helpers import rel_err
from support.original_cvt import SMALL_SPEC, OriginalCvT

pytestmark = pytest.mark.integration
yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("original")
    model = randomize_(OriginalCvT(SMALL_SPEC, num_classes=10), torch.Generator().manual_seed(0))
    torch.save(model.state_dict(), root / "final_state.pth")
    spec = {"MODEL": {"NAME": "cls_cvt", "NUM_CLASSES": 10, "SPEC": SMALL_SPEC}, "TEST": {"IMAGE_SIZE": [48, 48]}}
    (root / "cvt-small.yaml").write_text(yaml.safe_dump(spec))
    return model.double().eval(), root


def convert(capsys, *argv):
    return cli_main(capsys, "convert", *map(str, argv))


def test_converted_folder_loads_with_the_original_answers_in_cvt_fast_and_key_for_key_in_transformers(
    original, tmp_path
):
    reference, root = original
    result = subprocess.run(
        [sys.executable, "-m", "cvt_fast", "convert", "--checkpoint", root / "final_state.pth", "--spec",
         root / "cvt-small.yaml", "--output", tmp_path / "converted"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"wrote {tmp_path / 'converted'}: config.json, model.safetensors, preprocessor_config.json "
                        "(0.1M parameters, 10 labels, 48 px)")  # fmt: skip
    assert lines[1].startswith("note: the config keeps hidden_act 'quick_gelu'") and "transformers" in lines[1]
    ours = CvtForImageClassification.from_pretrained(tmp_path / "converted").double()
    x = pixels()
    with torch.inference_mode():
        # float64 on both sides, of the same (float32) weights: the conversion must lose nothing
        assert rel_err(ours(x).logits, reference(x)) < 1e-12
    transformers = pytest.importorskip("transformers")
    theirs, info = transformers.CvtForImageClassification.from_pretrained(
        tmp_path / "converted", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    exact = CvtForImageClassification.from_pretrained(tmp_path / "converted", hidden_act="gelu").eval()
    with torch.inference_mode():
        assert rel_err(theirs.eval()(x.float()).logits, exact(x.float()).logits) < 2e-5
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "converted")
    assert processor.size == {"shortest_edge": 48}


def test_refusals_are_one_line_with_status_2_and_write_nothing(original, tmp_path, capsys):
    _, root = original
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pth")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("the user's")
    cases = [
        (["--checkpoint", tmp_path / "resnet.pth", "--spec", root / "cvt-small.yaml"],
         f"cvt-fast convert: {tmp_path / 'resnet.pth'}: not an original CvT checkpoint: none of its 1 keys is in "
         "microsoft/CvT's layout (stage0.patch_embed.proj.weight, ...); it has conv1.weight"),
        (["--checkpoint", root / "final_state.pth", "--spec", "cvt-13"],
         f"cvt-fast convert: {root / 'final_state.pth'}: the spec's DEPTH (1, 2, 10) does not match the checkpoint's "
         "(1, 2, 3); give the spec it was trained with"),
        (["--checkpoint", tmp_path / "missing.pth", "--spec", "cvt-13"],
         f"cvt-fast convert: argument --checkpoint: {tmp_path / 'missing.pth'} is not a file; expected an original "
         "CvT .pth"),
        (["--checkpoint", root / "final_state.pth", "--spec", "cvt-31"],
         "cvt-fast convert: cvt-31: neither a file nor a preset; expected a YAML spec file or one of the presets "
         "cvt-13, cvt-13-384, cvt-21, cvt-21-384, cvt-w24, cvt-w24-384"),
    ]  # fmt: skip
    for argv, message in cases:
        status, out, err = convert(capsys, *argv, "--output", tmp_path / "out")
        assert status == 2 and out == "" and len(err) == 1 and err[0].startswith(message), err
    status, _, err = convert(capsys, "--checkpoint", root / "final_state.pth", "--spec", root / "cvt-small.yaml",
                             "--output", tmp_path / "full")  # fmt: skip
    assert status == 2 and err == [
        f"cvt-fast convert: argument --output: {tmp_path / 'full'} exists and is not an empty folder; expected a new "
        "folder"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "resnet.pth"]  # no output, no scratch left
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def _full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _unwritable_parent(*args, dir=None, **kwargs):
    raise PermissionError(13, "Permission denied", f"{dir}/.out.scratch")  # as mkdtemp names its folder


def _rename_fails(source, target, _replace=os.replace):
    if Path(target).name == "out":  # the scratch folder's rename into place; save_pretrained's own renames go on
        raise OSError(18, "Invalid cross-device link")
    _replace(source, target)


@pytest.mark.parametrize(
    "failing, failure, reason",
    [
        ("tempfile.mkdtemp", _unwritable_parent, "[Errno 13] Permission denied"),  # the parent cannot be written in
        ("safetensors.torch.save_file", _full_disk, "[Errno 28] No space left on device"),  # the model's save
        ("cvt_fast.image_processing.CvtImageProcessor.save_pretrained", _full_disk,
         "[Errno 28] No space left on device"),
        ("os.replace", _rename_fails, "[Errno 18] Invalid cross-device link"),
    ],
    ids=["scratch folder", "weights", "preprocessor config", "rename into place"],
)  # fmt: skip
@pytest.mark.parametrize("existing", [False, True], ids=["new output", "empty output folder"])
def test_a_write_that_fails_leaves_nothing_and_names_the_output(
    original, tmp_path, capsys, monkeypatch, failing, failure, reason, existing
):
    _, root = original
    monkeypatch.setattr(failing, failure)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    status, _, err = convert(capsys, "--checkpoint", root / "final_state.pth", "--spec", root / "cvt-small.yaml",
                             "--output", out)  # fmt: skip
    assert status == 2 and err == [f"cvt-fast convert: cannot write {out} ({reason}); nothing was written"]
    assert list(tmp_path.iterdir()) == ([out] if existing else [])  # no scratch left; the user's empty folder kept
    assert not existing or list(out.iterdir()) == []


def test_an_empty_output_folder_is_written_into(original, tmp_path, capsys):
    _, root = original
    (tmp_path / "out").mkdir()
    status, _, _ = convert(capsys, "--checkpoint", root / "final_state.pth", "--spec", root / "cvt-small.yaml",
                           "--output", tmp_path / "out")  # fmt: skip
    assert status == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
