"""`cvt-fast evaluate`: a checkpoint's top-1, top-5 and per-class accuracy on a labelled folder (FOLDER/<class>/...),
against counts made image by image with the model itself; unreadable images counted apart; refusals in one line."""

import json
import shutil

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


def make_checkpoint(folder, labels=LABELS):
    config = CvtConfig(depth=[1, 1], embed_dim=[8, 16], num_heads=[1, 2], cls_token=[False, True],
                       id2label=dict(enumerate(labels)))  # fmt: skip
    randomize_(CvtForImageClassification(config), torch.Generator().manual_seed(5)).save_pretrained(folder)
    CvtImageProcessor(size=32).save_pretrained(folder)


def make_images(root, folders):
    rng = np.random.default_rng(1)
    for k, folder in enumerate(folders):
        (root / "data" / folder).mkdir(parents=True)
        for i in range(4 + k):
            pixels = rng.integers(0, 256, size=(30 + i, 34, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / folder / f"{i}.png")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    make_checkpoint(root / "ckpt")
    make_images(root, FOLDERS)
    (root / "data" / "teapot" / "broken.png").write_bytes(b"not a png")
    return root


def expected_counts(root, folders=FOLDERS):
    """{folder: (images, unreadable, top-1 hits, top-5 hits)}, the model run on each image by itself."""
    model = CvtForImageClassification.from_pretrained(root / "ckpt")
    processor = CvtImageProcessor.from_pretrained(root / "ckpt")
    counts = {}
    for folder, label in folders.items():
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
    assert "| class folder | label | images | unreadable | top-1 | top-1 accuracy |\n|---|---|---|---|---|---|\n" in out
    assert f"| teapot | 2 | {counts['teapot'][0]} | 1 |" in out


def test_top5_is_not_scored_for_a_model_of_fewer_than_5_labels(tmp_path, capsys):
    """Every image is a top-5 hit when the model has 3 labels: a score of 1.0 would say nothing, so none is given."""
    folders = {"a": 0, "c": 2}
    make_checkpoint(tmp_path / "ckpt", labels=["a", "b", "c"])
    make_images(tmp_path, folders)
    status = cli.main(["evaluate", "--model", str(tmp_path / "ckpt"), "--input", str(tmp_path / "data"), "--output",
                       str(tmp_path / "results.jsonl"), "--metrics", str(tmp_path / "metrics.json"),
                       "--workers", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    counts = expected_counts(tmp_path, folders)
    top1, scored = sum(c[2] for c in counts.values()), sum(c[0] for c in counts.values())
    assert f"top-1 {top1 / scored:.4f} ({top1}/{scored}), top-5 - (the model has 3 labels, under 5) over " \
        "the readable images\n" in out  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"images", "unreadable", "top1", "top5", "classes"}
    assert (metrics["images"], metrics["top1"], metrics["top5"]) == (scored, top1, None)
    assert [(c["folder"], c["top1"], c["top5"]) for c in metrics["classes"]] == [
        (folder, counts[folder][2], None) for folder in folders]  # fmt: skip


def test_evaluate_classifies_the_folder_as_classify_input_does(labelled, tmp_path, monkeypatch):
    """evaluate runs the folder through the same code as `classify --input ... --top-k 5`, with its own options'
    values, and scores nothing after a run that failed."""
    from cvt_fast.cli import model_source

    seen = {}
    monkeypatch.setattr(model_source, "classify_folder", lambda args, package: seen.update(vars(args), package=package)
                        or 1)  # fmt: skip
    status = cli.main(["evaluate", "--model", str(labelled / "ckpt"), "--input", str(labelled / "data"), "--output",
                       str(tmp_path / "results.jsonl"), "--batch-size", "3", "--dtype", "bfloat16"])  # fmt: skip
    assert status == 1  # the run's status, and no scoring after it
    names = ("top_k", "compile", "batch_size", "dtype", "package")
    assert [seen[name] for name in names] == [5, False, 3, "bfloat16", False]
    assert (seen["model"], seen["input"], seen["output"]) == (str(labelled / "ckpt"), str(labelled / "data"),
                                                            tmp_path / "results.jsonl")  # fmt: skip


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
        (lambda d: shutil.copytree(d / "teapot", d / "2"),
         "argument --input: class folders '2' and 'teapot' both name label 2 ('teapot'); expected one folder per "
         "label"),
    ],
    ids=["an image outside a class folder", "a folder that names no label", "an index past the labels",
         "two folders of one label"],
)  # fmt: skip
def test_a_folder_that_is_not_labelled_is_refused_before_the_model_runs(labelled, tmp_path, capsys, make, message):
    data = tmp_path / "data"
    shutil.copytree(labelled / "data", data)
    make(data)
    status = cli.main(["evaluate", "--model", str(labelled / "ckpt"), "--input", str(data), "--output",
                       str(tmp_path / "results.jsonl")])  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and err == [f"cvt-fast evaluate: {message.format(d=data)}"], err
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "results.jsonl.parts").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input", "{t}/results.jsonl"],
         "argument --input: {t}/results.jsonl is not a folder; expected FOLDER/<class>/<image>"),
        (["--metrics", "{t}/nodir/metrics.json"],
         "argument --metrics: {t}/nodir/metrics.json is in {t}/nodir, which is not a folder; expected a file in an "
         "existing folder"),
        (["--metrics", "{t}"],
         "argument --metrics: {t} is a folder; expected a file in an existing folder"),
        (["--metrics", "{t}/../{n}/results.jsonl"],
         "argument --metrics: {t}/../{n}/results.jsonl is the --output file; expected another file, or the results "
         "would be overwritten by the scores"),
    ],
    ids=["--input not a folder", "--metrics in no folder", "--metrics a folder",
         "--metrics the --output file"],
)  # fmt: skip
def test_a_wrong_argument_is_refused_before_the_run(labelled, tmp_path, capsys, argv, message):
    (tmp_path / "results.jsonl").write_text("")  # an earlier run's results, left as they are
    given = {"--model": str(labelled / "ckpt"), "--input": str(labelled / "data"),
             "--output": str(tmp_path / "results.jsonl")}  # fmt: skip
    given[argv[0]] = argv[1].format(t=tmp_path, n=tmp_path.name)
    status = cli.main(["evaluate", *(part for pair in given.items() for part in pair)])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and err == [f"cvt-fast evaluate: {message.format(t=tmp_path, n=tmp_path.name)}"], err
    assert (tmp_path / "results.jsonl").read_text() == "" and not (tmp_path / "results.jsonl.parts").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]
