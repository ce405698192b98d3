"""`cvt-fast evaluate`: a checkpoint's top-1, top-5 and per-class accuracy on a labelled folder (FOLDER/<class>/...),
against counts made image by image with the model itself; unreadable images counted apart; refusals in one line."""

import json

import numpy as np
import pytest
import torch

from cvt_fast import CvtConfig, CvtForImageClassification, cli
from cvt_fast.image_processing import CvtImageProcessor
from cvt_fast.testing import randomize_

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.integration

# More labels than top-5 holds, so that a top-5 miss can happen. Class folders are named as labels, and one as a label
# index (3: "volcano"); an image's class is what its folder says.
LABELS = ["tabby cat", "golden retriever", "teapot", "volcano", "lighthouse", "kite", "pretzel", "goldfish"]
FOLDERS = {"tabby cat": 0, "teapot": 2, "3": 3}


def make_checkpoint(folder):
    config = CvtConfig(depth=[1, 1], embed_dim=[8, 16], num_heads=[1, 2], cls_token=[False, True],
                       id2label=dict(enumerate(LABELS)))  # fmt: skip
    randomize_(CvtForImageClassification(config), torch.Generator().manual_seed(5)).save_pretrained(folder)
    CvtImageProcessor(size=32).save_pretrained(folder)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    make_checkpoint(root / "ckpt")
    rng = np.random.default_rng(1)
    for k, folder in enumerate(FOLDERS):
        (root / "data" / folder).mkdir(parents=True)
        for i in range(4 + k):
            pixels = rng.integers(0, 256, size=(30 + i, 34, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / folder / f"{i}.png")
    (root / "data" / "teapot" / "broken.png").write_bytes(b"not a png")
    return root


def expected_counts(root):
    """{folder: (images, unreadable, top-1 hits, top-5 hits)}, the model run on each image by itself."""
    model = CvtForImageClassification.from_pretrained(root / "ckpt")
    processor = CvtImageProcessor.from_pretrained(root / "ckpt")
    counts = {}
    for folder, label in FOLDERS.items():
        images = unreadable = top1 = top5 = 0
        for path in sorted((root / "data" / folder).iterdir()):
            images += 1
            try:
                with Image.open(path) as image, torch.no_grad():
                    ranked = model(**processor(image)).logits[0].argsort(descending=True).tolist()
            except Exception:  # noqa: BLE001 - Pillow's refusal of the broken file
                unreadable += 1
                continue
            top1 += ranked[0] == label
            top5 += label in ranked[:5]
        counts[folder] = (images, unreadable, top1, top5)
    return counts


def test_scores_each_class_as_the_model_does_image_by_image(labelled, capsys):
    root = labelled
    status = cli.main(["evaluate", "--model", str(root / "ckpt"), "--input", str(root / "data"), "--output",
                       str(root / "results.jsonl"), "--metrics", str(root / "metrics.json"),
                       "--workers", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    counts = expected_counts(root)
    metrics = json.loads((root / "metrics.json").read_text())
    by_folder = {c["folder"]: c for c in metrics["classes"]}
    for folder, (images, unreadable, top1, top5) in counts.items():
        c = by_folder[folder]
        assert (c["label_id"], c["images"], c["unreadable"], c["top1"], c["top5"]) == (
            FOLDERS[folder], images, unreadable, top1, top5), folder  # fmt: skip
    scored = sum(n - u for n, u, _, _ in counts.values())
    top1, top5 = sum(c[2] for c in counts.values()), sum(c[3] for c in counts.values())
    assert metrics["unreadable"] == 1 and metrics["images"] == scored + 1
    assert 0 < top5 < scored and top1 < top5, "the images must show both kinds of hit and miss"
    assert f"top-1 {top1 / scored:.4f} ({top1}/{scored}), top-5 {top5 / scored:.4f} ({top5}/{scored}) over the " \
        "readable images; 1 unreadable, not scored" in out  # fmt: skip
    assert f"| teapot | 2 | {counts['teapot'][0]} | 1 |" in out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "loose.png").write_bytes((d / "3" / "0.png").read_bytes()),
         "argument --input: {d}/loose.png is not in a class folder; expected {d}/<class>/<image> for every image "
         "(1 are not)"),
        (lambda d: (d / "tabby cat").rename(d / "tabby"),
         "argument --input: class folder(s) 'tabby' name none of the model's 8 labels ('tabby cat', 'golden "
         "retriever', 'teapot', 'volcano', 'lighthouse', ...) nor a label index 0-7"),
        (lambda d: (d / "3").rename(d / "9"),
         "argument --input: class folder(s) '9' name none of the model's 8 labels ('tabby cat', 'golden retriever', "
         "'teapot', 'volcano', 'lighthouse', ...) nor a label index 0-7"),
    ],
    ids=["an image outside a class folder", "a folder that names no label", "an index past the labels"],
)  # fmt: skip
def test_a_folder_that_is_not_labelled_is_refused_before_the_model_runs(labelled, tmp_path, capsys, make, message):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(labelled / "data", data)
    make(data)
    status = cli.main(["evaluate", "--model", str(labelled / "ckpt"), "--input", str(data), "--output",
                       str(tmp_path / "results.jsonl")])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and err == [f"cvt-fast evaluate: {message.format(d=data)}"], err
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "results.jsonl.parts").exists()
