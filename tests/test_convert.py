"""`cvt-fast convert`: an original CvT checkpoint (microsoft/CvT's .pth and YAML spec) into transformers' format, which
cvt_fast loads with the same answers and transformers loads key for key; refusals in one line, nothing half-written."""

import subprocess
import sys

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
        assert rel_err(ours(x).logits, reference(x)) < 2e-5  # float32 weights, as the .pth holds them
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
         f"cvt-fast convert: {root / 'final_state.pth'} does not fit the spec: stage0.patch_embed.proj.weight is "
         "(16, 3, 7, 7), the spec makes it (64, 3, 7, 7)"),
        (["--checkpoint", tmp_path / "missing.pth", "--spec", "cvt-13"],
         f"cvt-fast convert: argument --checkpoint: {tmp_path / 'missing.pth'} is not a file; expected an original "
         "CvT .pth"),
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


def test_a_write_that_fails_midway_leaves_nothing(original, tmp_path, capsys, monkeypatch):
    _, root = original
    from cvt_fast.image_processing import CvtImageProcessor

    def full_disk(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CvtImageProcessor, "save_pretrained", full_disk)
    out = tmp_path / "out"
    status, _, err = convert(capsys, "--checkpoint", root / "final_state.pth", "--spec", root / "cvt-small.yaml",
                             "--output", out)  # fmt: skip
    assert status == 2 and err == [
        f"cvt-fast convert: cannot write {out} ([Errno 28] No space left on device); nothing was written"
    ]
    assert list(tmp_path.iterdir()) == []
