"""`cvt-fast classify --input ... --output ...`: a folder or a list of images into one JSON line per image, in one
process and under torchrun, complete, in order, resumable, with unreadable images reported and never dropped.

In-process runs use --workers 0 (decoding in this process, where a test can count it); the torchrun runs use loader
workers, as users do."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cvt_fast
from cvt_fast import cli
from cvt_fast.image_processing import CvtImageProcessor
from cvt_fast.testing import randomize_
from cvt_fast.tools import dataset_inference as di
from cvt_fast.tools.dataset_inference import loader

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
LABELS = {0: "tabby cat", 1: "golden retriever", 2: "teapot", 3: "volcano", 4: "lighthouse"}
UNREADABLE = {
    "bad.jpg": "not an image file (Pillow does not recognise its format)",
    "empty.png": "not an image file (Pillow does not recognise its format)",
    "sub/cut.jpg": "cannot be decoded (image file is truncated",
}
TOP_K = 3


def make_checkpoint(folder: Path) -> Path:
    config = cvt_fast.CvtConfig(depth=[1, 1], embed_dim=[8, 16], num_heads=[1, 2], cls_token=[False, True])
    config.update(id2label=LABELS)
    model = randomize_(cvt_fast.CvtForImageClassification(config), torch.Generator().manual_seed(5)).eval()
    model.save_pretrained(folder)
    CvtImageProcessor(size=32).save_pretrained(folder)
    return folder


def make_images(folder: Path, readable: int = 10) -> list[str]:
    """`readable` small images of assorted sizes, modes and formats (one with an upper-case extension, some in a
    subfolder), the unreadable files of UNREADABLE, and files that are not listed (a hidden one, a text file).
    Returns the relative names of the readable ones."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    names = []
    for i in range(readable):
        name = ("sub/" if i % 3 == 0 else "") + f"img{i:02d}" + (".png", ".jpg", ".JPG")[i % 3]
        mode_shape = [(36 + i, 45, 3), (50, 33 + i), (40, 40, 4)][i % 3]
        pixels = rng.integers(0, 256, size=mode_shape, dtype=np.uint8)
        image = Image.fromarray(pixels)
        if name.lower().endswith(".jpg"):
            image = image.convert("RGB")
        image.save(folder / name, format="JPEG" if name.lower().endswith(".jpg") else "PNG")
        names.append(name)
    (folder / "bad.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    jpeg = (folder / names[1]).read_bytes()
    (folder / "sub" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / ".hidden.jpg").write_text("an editor's backup, not an image")
    (folder / "notes.txt").write_text("not listed")
    return names


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A checkpoint and a folder of 13 images (10 readable, 3 not: an odd count), shared by the module's tests."""
    root = tmp_path_factory.mktemp("dataset")
    make_checkpoint(root / "ckpt")
    readable = make_images(root / "images")
    return root, readable


@pytest.fixture(scope="module")
def expected(workspace):
    """path -> (labels, scores) computed image by image with the model and processor themselves: no DataLoader, no
    batching, no files."""
    root, readable = workspace
    model = cvt_fast.CvtForImageClassification.from_pretrained(root / "ckpt")
    processor = CvtImageProcessor.from_pretrained(root / "ckpt")
    answers = {}
    for name in readable:
        with Image.open(root / "images" / name) as image, torch.no_grad():
            probabilities = model(**processor(image)).logits.softmax(-1)[0]
        top = probabilities.topk(TOP_K)
        answers[str(root / "images" / name)] = ([LABELS[i] for i in top.indices.tolist()], top.values.tolist())
    return answers


def classify(capsys, *argv):
    """cli.main in this process: (exit status, stdout lines, stderr lines)."""
    try:
        status = cli.main(["classify", *map(str, argv)])
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def dataset_args(root: Path, output: Path, *extra):
    return ["--model", root / "ckpt", "--input", root / "images", "--output", output, "--top-k", TOP_K, *extra]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def listed(root: Path, readable: list[str]) -> list[str]:
    """What the folder's run must cover: every image file, readable or not, sorted by path."""
    return sorted(str(root / "images" / name) for name in [*readable, *UNREADABLE])


def assert_complete_and_right(records: list[dict], root: Path, readable: list[str], expected: dict) -> None:
    assert [r["path"] for r in records] == listed(root, readable)  # every image once, sorted by path
    for record in records:
        relative = os.path.relpath(record["path"], root / "images")
        if relative in UNREADABLE:
            assert set(record) == {"path", "error"} and record["error"].startswith(UNREADABLE[relative])
            continue
        labels, scores = expected[record["path"]]
        assert record["labels"] == labels
        assert record["label_ids"] == [{v: k for k, v in LABELS.items()}[label] for label in labels]
        assert np.allclose(record["scores"], scores, rtol=0, atol=2e-6)  # written to 6 decimals


@pytest.fixture
def count_reads(monkeypatch):
    """The paths decoded in this process (--workers 0), in order (patched where the loader's dataset looks it up)."""
    reads = []
    real = di.read_pixel_values

    def counting(path, processor):
        reads.append(path)
        return real(path, processor)

    monkeypatch.setattr(loader, "read_pixel_values", counting)
    return reads


# ---- pieces ---------------------------------------------------------------------------------------------------


def test_shards_are_disjoint_cover_everything_and_are_balanced():
    for count in range(0, 23):
        items = [f"image{i}" for i in range(count)]
        for world_size in range(1, 6):
            shards = [list(di.shard(items, rank, world_size)) for rank in range(world_size)]
            assert [item for s in shards for item in s] == items  # in order: disjoint, no gap, nothing twice
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_a_folder_is_listed_recursively_sorted_without_hidden_or_other_files(workspace):
    root, readable = workspace
    listing = di.list_images(str(root / "images"))
    assert listing.paths == listed(root, readable)
    assert listing.notes == [f"{root / 'images'}: 1 file(s) without an image extension left out"]


def test_a_list_file_is_read_line_by_line_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_bytes(b"b.jpg\r\n\n  \n/abs/a.png\nsub dir/c d.png\nb.jpg\n")
    listing = di.list_images("list.txt")
    assert listing.paths == ["/abs/a.png", "b.jpg", "sub dir/c d.png"]
    assert listing.notes == ["list.txt names 1 path(s) more than once; each is classified once"]


def test_torn_and_damaged_lines_are_dropped_on_repair(tmp_path):
    part = tmp_path / "rank-0.jsonl"
    good = [di.result_line("a.jpg", labels=["x"], scores=[0.5], label_ids=[0]), di.result_line("b.jpg", error="no")]
    part.write_text(good[0] + '{"path": "junk"}\n' + good[1] + good[0][:20])
    assert di.repair(part) == 2
    assert part.read_text() == good[0] + good[1]
    assert di.repair(part) == 0
    # killed between a record and its newline: the JSON is whole, the line is not (the next append would join it)
    part.write_text(good[0] + good[1].removesuffix("\n"))
    assert di.repair(part) == 1
    assert part.read_text() == good[0]


def test_a_merge_that_fails_midway_leaves_the_previous_output_and_the_parts(tmp_path, monkeypatch):
    """OUTPUT is written beside its final name and renamed: a failure while writing (a full disk) leaves the previous
    OUTPUT whole and the part files in place, so that a rerun can finish."""
    from cvt_fast.tools.dataset_inference import results

    files = results.RunFiles(tmp_path / "results.jsonl")
    files.folder.mkdir()
    lines = [di.result_line(f"{name}.jpg", labels=["x"], scores=[0.5], label_ids=[0]) for name in "abc"]
    files.output.write_text(lines[0] + lines[1])  # an earlier, finished run
    files.part(0).write_text(lines[2])  # this run's new image

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        results.merge(files, ["a.jpg", "b.jpg", "c.jpg"])
    assert files.output.read_text() == lines[0] + lines[1] and files.part(0).read_text() == lines[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "results.jsonl.parts"]
    monkeypatch.undo()
    assert results.merge(files, ["a.jpg", "b.jpg", "c.jpg"]) == lines and files.output.read_text() == "".join(lines)


def test_progress_is_a_plain_line_now_and_then_in_a_log():
    clock = iter([0.0, 10.0, 31.0, 31.0, 40.0, 40.0]).__next__  # one reading per call
    stream = io.StringIO()
    progress = di.Progress(total=100, stream=stream, clock=clock, plain_every=30.0)
    progress.update(25)  # at 10 s: too soon for another line
    progress.update(90)  # at 31 s
    progress.update(100)  # the end always shows
    assert stream.getvalue().splitlines() == [
        "90/100 images, 2.9 images/s, 31s so far, ETA 3s",
        "100/100 images, 2.5 images/s, 40s so far, ETA 0s",
    ]


def test_progress_overwrites_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = iter([0.0, 2.0, 2.0, 2.1, 4.0, 4.0]).__next__
    stream = Terminal()
    progress = di.Progress(total=10, prefix="rank 0 of 2: ", stream=stream, clock=clock)
    progress.update(4)
    progress.update(5)  # 0.1 s later: not redrawn
    progress.update(10)
    progress.close()
    assert stream.getvalue() == (
        "\r\033[Krank 0 of 2: 4/10 images, 2.0 images/s, 2s so far, ETA 3s"
        "\r\033[Krank 0 of 2: 10/10 images, 2.5 images/s, 4s so far, ETA 0s\r\033[K"
    )


def test_a_refusal_on_any_rank_reaches_every_rank_naming_it():
    class TwoRanks(di.Coordinator):
        def gather(self, value):
            return [value, ("cannot write rank-1.jsonl",)]  # as if rank 1 had refused

    coordinator = TwoRanks(di.Ranks())
    with pytest.raises(cvt_fast.errors.Refused) as refused:
        coordinator.agree(lambda: "rank 0 is fine")
    assert refused.value.lines == ("rank 1: cannot write rank-1.jsonl",)


# ---- one process ----------------------------------------------------------------------------------------------


def test_a_folder_gives_every_image_once_sorted_with_the_unreadable_reported(capsys, workspace, expected, tmp_path):
    root, readable = workspace
    output = tmp_path / "results.jsonl"
    status, out, err = classify(capsys, *dataset_args(root, output, "--workers", "0", "--batch-size", "4"))
    assert status == 0, err
    assert_complete_and_right(read_records(output), root, readable, expected)
    assert out[0] == f"{output}: 13 images, 10 classified, 3 unreadable (one line each, sorted by path)"
    assert out[1] == "unreadable images:"
    assert sorted(line.split(": ", 1)[0].strip() for line in out[2:5]) == sorted(
        str(root / "images" / name) for name in UNREADABLE
    )
    assert out[5].startswith("this run: 13 images in ") and "on 1 process(es)" in out[5]
    assert re.match(r"  decode \+ preprocess: .* of main-process time \(--workers 0\), [\d.]+ images/s", out[6])
    assert re.match(r"  model: [\d.]+ s per process, [\d.]+ images/s per process", out[7])
    assert not list((tmp_path / "results.jsonl.parts").glob("rank-*"))  # merged, then gone
    assert json.loads((tmp_path / "results.jsonl.parts" / "run.json").read_text())["top_k"] == TOP_K


def test_a_list_file_names_what_to_classify(capsys, workspace, expected, tmp_path):
    root, readable = workspace
    chosen = [str(root / "images" / name) for name in readable[:3]] + [str(root / "images" / "missing.jpg")]
    (tmp_path / "list.txt").write_text("\n".join(reversed(chosen)) + "\n")
    output = tmp_path / "results.jsonl"
    status, out, err = classify(
        capsys, "--model", root / "ckpt", "--input", tmp_path / "list.txt", "--output", output, "--workers", "0"
    )
    assert status == 0, err
    records = read_records(output)
    assert [r["path"] for r in records] == sorted(chosen)
    assert records[[r["path"] for r in records].index(chosen[-1])] == {"path": chosen[-1], "error": "no such file"}
    for record in records:
        if "labels" in record:
            assert record["labels"][:TOP_K] == expected[record["path"]][0] and len(record["labels"]) == 5


def test_without_resizing_images_of_several_sizes_share_batches_and_one_too_small_is_reported(capsys, workspace,
                                                                                               tmp_path):  # fmt: skip
    root, _ = workspace
    checkpoint = shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    CvtImageProcessor(do_resize=False).save_pretrained(checkpoint)  # sizes as they come
    rng = np.random.default_rng(3)
    (tmp_path / "images").mkdir()
    for name, shape in [("a.png", (20, 27, 3)), ("b.png", (5, 5, 3)), ("c.png", (31, 17, 3)), ("d.png", (20, 27, 3))]:
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(tmp_path / "images" / name)
    output = tmp_path / "r.jsonl"
    args = ["--model", checkpoint, "--input", tmp_path / "images", "--output", output, "--workers", "0", "--top-k", 2]
    status, _, err = classify(capsys, *args, "--batch-size", "4")  # one batch, three sizes
    assert status == 0, err
    records = {os.path.basename(r["path"]): r for r in read_records(output)}
    assert records["b.png"]["error"].startswith(
        "after preprocessing, image of 5x5 pixels is smaller than the model's total stride"
    )
    model = cvt_fast.CvtForImageClassification.from_pretrained(checkpoint)
    processor = CvtImageProcessor.from_pretrained(checkpoint)
    for name in ("a.png", "c.png", "d.png"):
        with Image.open(tmp_path / "images" / name) as image, torch.no_grad():
            top = model(**processor(image)).logits.softmax(-1)[0].topk(2)
        assert records[name]["label_ids"] == top.indices.tolist()
        assert np.allclose(records[name]["scores"], top.values.tolist(), rtol=0, atol=2e-6)


def interrupted_state(output: Path, full: list[str]) -> set[int]:
    """Files as a two-rank run leaves them when killed midway: rank 0 wrote lines 0-2 and half of line 3, rank 1 lines
    7-8, no output yet. Returns the indices of the lines left to do."""
    parts = output.with_name(output.name + ".parts")
    output.unlink()
    (parts / "rank-0.jsonl").write_text("".join(full[:3]) + full[3][: len(full[3]) // 2])
    (parts / "rank-1.jsonl").write_text("".join(full[7:9]))
    return set(range(len(full))) - {0, 1, 2, 7, 8}


def test_an_interrupted_run_resumes_doing_only_what_is_missing(capsys, workspace, expected, tmp_path, count_reads):
    root, readable = workspace
    output = tmp_path / "results.jsonl"
    args = dataset_args(root, output, "--workers", "0", "--batch-size", "3")
    assert classify(capsys, *args)[0] == 0
    full = output.read_text().splitlines(keepends=True)
    missing = interrupted_state(output, full)
    count_reads.clear()

    status, out, err = classify(capsys, *args)
    assert status == 0, err
    paths = [json.loads(line)["path"] for line in full]
    assert count_reads == [paths[i] for i in sorted(missing)]  # each missing image once; nothing finished redone
    assert (
        f"note: {output}.parts/rank-0.jsonl: dropped 1 torn or damaged line(s) of an interrupted run; redoing them"
        in err
    )
    assert out[5].startswith(f"this run: {len(missing)} images in ") and out[5].endswith("; 5 done by an earlier run")
    resumed = output.read_text().splitlines(keepends=True)
    assert [resumed[i] for i in (0, 1, 2, 7, 8)] == [full[i] for i in (0, 1, 2, 7, 8)]  # kept as written
    assert_complete_and_right(read_records(output), root, readable, expected)


def test_a_finished_run_rerun_does_nothing_and_a_new_image_only_adds_itself(capsys, workspace, tmp_path, count_reads):
    root, _ = workspace
    images = shutil.copytree(root / "images", tmp_path / "images")
    output = tmp_path / "results.jsonl"
    args = ["--model", root / "ckpt", "--input", images, "--output", output, "--workers", "0"]
    assert classify(capsys, *args)[0] == 0
    before = output.read_bytes()
    count_reads.clear()
    status, out, _ = classify(capsys, *args)
    assert status == 0 and count_reads == [] and output.read_bytes() == before
    assert out[-1] == "this run: nothing left to do; 13 done by an earlier run"

    shutil.copy(images / "img01.jpg", images / "sub" / "img00b.jpg")
    status, out, _ = classify(capsys, *args)
    assert status == 0 and count_reads == [str(images / "sub" / "img00b.jpg")]
    lines = output.read_text().splitlines(keepends=True)
    assert "".join(line for line in lines if "img00b" not in line).encode() == before
    assert [json.loads(line)["path"] for line in lines] == sorted(json.loads(line)["path"] for line in lines)


def test_a_rerun_after_images_went_and_came_holds_exactly_the_listing_of_now(capsys, workspace, tmp_path, count_reads):
    """Images removed, and images with non-ASCII names added, between two runs: the output then holds the folder as it
    is now, every image once, sorted by path, the lines of the images that stayed exactly as before, and only the new
    ones read."""
    root, _ = workspace
    images = shutil.copytree(root / "images", tmp_path / "images")
    output = tmp_path / "results.jsonl"
    args = ["--model", root / "ckpt", "--input", images, "--output", output, "--workers", "0"]
    assert classify(capsys, *args)[0] == 0
    first = {json.loads(line)["path"]: line for line in output.read_text(encoding="utf-8").splitlines()}
    removed = [images / "img01.jpg", images / "sub" / "img03.png"]
    for path in removed:
        path.unlink()
    added = [images / "çà été.jpg", images / "sub" / "日本語 ✓.jpg"]
    for path in added:
        shutil.copy(images / "img07.jpg", path)
    count_reads.clear()
    status, _, err = classify(capsys, *args)
    assert status == 0, err
    lines = output.read_text(encoding="utf-8").splitlines()
    paths = [json.loads(line)["path"] for line in lines]
    now = sorted(str(p) for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".png") and p.name[0] != ".")
    assert paths == now and not set(map(str, removed)) & set(paths)
    assert sorted(count_reads) == sorted(map(str, added))
    for line, path in zip(lines, paths, strict=True):
        if path in first:
            assert line == first[path], path
    same_pixels = json.loads(lines[paths.index(str(added[0]))])
    assert same_pixels["labels"] == json.loads(first[str(images / "img07.jpg")])["labels"]


def test_a_rerun_may_spell_the_folder_differently_but_not_move_the_paths(
    capsys, workspace, tmp_path, monkeypatch, count_reads
):
    """`images`, `images/` and `images//.` give the same result paths, so any of them resumes the run; `./images` or
    an absolute spelling would change every path (and redo every image), so they are refused, naming the spelling."""
    root, _ = workspace
    shutil.copytree(root / "images", tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    args = ["--model", root / "ckpt", "--output", "results.jsonl", "--workers", "0"]
    assert classify(capsys, *args, "--input", "images/")[0] == 0
    before = (tmp_path / "results.jsonl").read_bytes()
    assert json.loads(before.splitlines()[0])["path"].startswith("images/bad")
    for spelling in ("images", "images//", "images//."):
        count_reads.clear()
        status, out, _ = classify(capsys, *args, "--input", spelling)
        assert status == 0 and count_reads == [] and (tmp_path / "results.jsonl").read_bytes() == before, spelling
    for spelling in ("./images", str(tmp_path / "images")):
        status, _, err = classify(capsys, *args, "--input", spelling)
        assert status == 2 and 'input_as_written "images" then, ' in err[0], spelling
    assert [di.folder_as_written(f) for f in ("/", "./", ".//a/./b/", "a/../b", "/x//")] == [
        "/",
        ".",
        "./a/b",
        "a/../b",
        "/x",
    ]


def test_other_options_or_a_foreign_output_are_refused_and_overwrite_starts_over(capsys, workspace, tmp_path):
    root, _ = workspace
    output = tmp_path / "results.jsonl"
    assert classify(capsys, *dataset_args(root, output, "--workers", "0"))[0] == 0
    args = ["--model", root / "ckpt", "--input", root / "images", "--output", output, "--workers", "0"]
    status, out, err = classify(capsys, *args, "--top-k", "2")
    assert status == 2 and out == []
    assert err == [
        f"cvt-fast classify: {output}: the results so far came from another model or other options (top_k 3 then, 2 "
        "now); rerun the same command to finish them, pass --overwrite to start over, or choose another --output"
    ]
    status, _, err = classify(capsys, *args, "--top-k", "2", "--overwrite")
    assert status == 0, err
    assert {len(r.get("labels", "ab")) for r in read_records(output)} == {2}

    foreign = tmp_path / "theirs.jsonl"
    foreign.write_text("someone else's results\n")
    status, _, err = classify(capsys, "--model", root / "ckpt", "--input", root / "images", "--output", foreign)
    assert status == 2 and foreign.read_text() == "someone else's results\n"
    assert err == [
        f"cvt-fast classify: {foreign} already exists, and no {foreign}.parts/run.json says which run produced it; "
        "pass --overwrite to replace it, or choose another --output"
    ]


def test_a_changed_checkpoint_is_refused(capsys, workspace, tmp_path):
    root, _ = workspace
    checkpoint = shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    args = ["--model", checkpoint, "--input", root / "images", "--output", tmp_path / "r.jsonl", "--workers", "0"]
    assert classify(capsys, *args)[0] == 0
    model = cvt_fast.CvtForImageClassification.from_pretrained(checkpoint)
    randomize_(model, torch.Generator().manual_seed(6)).save_pretrained(checkpoint)  # fine-tuned meanwhile, say
    status, _, err = classify(capsys, *args)
    assert status == 2 and len(err) == 1
    assert err[0].startswith(
        f"cvt-fast classify: {tmp_path / 'r.jsonl'}: the results so far came from another model or other options "
        '(checkpoint_sha256.model.safetensors "'
    )


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / "config.json").unlink(), "argument --model: {d} has no config.json; expected a checkpoint"),
        (lambda d: (d / "config.json").write_text("{'depth': [1, 1]}"), "{d}/config.json: is not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights in {d}: expected model.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
         "{d}/model.safetensors: not a readable safetensors file"),
        (lambda d: (d / "preprocessor_config.json").write_text(json.dumps({"size": 4})),
         "preprocessing makes every image 4 px square, but image of 4x4 pixels is smaller than the model's total "
         "stride"),
    ],
    ids=["no config.json", "config not JSON", "no weights", "truncated weights", "preprocessor size too small"],
)  # fmt: skip
def test_a_damaged_checkpoint_gets_one_line_and_once_mended_the_run_goes_ahead(capsys, workspace, tmp_path, damage,
                                                                               expected):  # fmt: skip
    root, _ = workspace
    checkpoint = shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    damage(checkpoint)
    args = ["--model", checkpoint, "--input", root / "images", "--output", tmp_path / "r.jsonl", "--workers", "0"]
    status, out, err = classify(capsys, *args)
    errors = [line for line in err if not line.startswith("note: ")]
    assert status == 2 and out == [] and len(errors) == 1
    assert errors[0].startswith("cvt-fast classify: " + expected.format(d=checkpoint)), errors
    shutil.rmtree(checkpoint)
    shutil.copytree(root / "ckpt", checkpoint)  # mended: a run that never wrote a result does not hold it back
    status, _, err = classify(capsys, *args)
    assert status == 0, err
    assert len(read_records(tmp_path / "r.jsonl")) == 13


LOADING = "the model was loaded before the arguments were checked"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--input", "{root}/nowhere", "--output", "{tmp}/r.jsonl"], "argument --input: {root}/nowhere: no such "
         "folder or file"),
        (["--input", "{tmp}/empty", "--output", "{tmp}/r.jsonl"], "argument --input: {tmp}/empty holds no image "
         "files (searched it recursively for .bmp, .gif, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp; 1 other "
         "file(s))"),
        (["--input", "{tmp}/blank.txt", "--output", "{tmp}/r.jsonl"], "argument --input: {tmp}/blank.txt names no "
         "image files (it has no non-blank line)"),
        (["--input", "", "--output", "{tmp}/r.jsonl"], "argument --input: an empty name is not a folder or a file"),
        (["--input", "{root}/images/img01.jpg", "--output", "{tmp}/r.jsonl"], "argument --input: "
         "{root}/images/img01.jpg is an image; --input takes a folder or a text file listing images"),
        (["--input", "{tmp}/list.txt", "--output", "{tmp}/list.txt"], "argument --output: {tmp}/list.txt is one of "
         "the inputs; writing it would destroy it"),
        (["--input", "{tmp}/list.txt", "--output", "{tmp}/named.jsonl"], "argument --output: {tmp}/named.jsonl is one "
         "of the inputs; writing it would destroy it"),
        (["--input", "{root}/images", "--output", "{tmp}/r.png"], "argument --output: {tmp}/r.png has an image "
         "extension; the results are JSON lines (e.g. results.jsonl)"),
        (["--input", "{root}/images", "--output", "{tmp}"], "argument --output: {tmp} is a folder; expected a file "
         "name such as results.jsonl"),
        (["--input", "{root}/images", "--output", "{tmp}/blank.txt/r.jsonl"], "argument --output: cannot write "
         "results beside {tmp}/blank.txt/r.jsonl ("),
        (["--input", "{root}/images"], "argument --input: needs --output, the JSON-lines file for the results"),
        (["--input", "{root}/images", "--output", "{tmp}/r.jsonl", "{root}/images/img01.jpg"], "give image files or "
         "--input, not both (got 1 file(s) and --input {root}/images)"),
        (["--output", "{tmp}/r.jsonl", "{root}/images/img01.jpg"], "argument --output: only with --input"),
        (["--workers", "2", "{root}/images/img01.jpg"], "argument --workers: only with --input"),
        (["--overwrite", "{root}/images/img01.jpg"], "argument --overwrite: only with --input"),
        ([], "give image files, or --input FOLDER_OR_LIST with --output FILE"),
        (["--input", "{root}/images", "--output", "{tmp}/r.jsonl", "--batch-size", "0"], "argument --batch-size: "
         "expected a number of at least 1, got 0 (see cvt-fast classify --help)"),
        (["--input", "{root}/images", "--output", "{tmp}/r.jsonl", "--workers", "-1"], "argument --workers: expected "
         "a number of at least 0, got -1"),
        (["--input", "{root}/images", "--output", "{tmp}/r.jsonl", "--dtype", "float8"], "argument --dtype: invalid "
         "choice: 'float8'"),
        (["--input", "{root}/images", "--output", "{tmp}/r.jsonl", "--device", "cuda:99"], "argument --device: device "
         "'cuda:99' is not available on this machine"),
    ],
    ids=["missing input", "folder without images", "empty list", "empty input name", "an image as the list",
         "output is the list", "output is a listed file", "output an image name", "output a folder",
         "output not writable", "input without output", "images and input", "output without input",
         "workers without input", "overwrite without input", "nothing to classify", "batch size 0", "workers -1",
         "dtype", "device"],
)  # fmt: skip
def test_bad_dataset_arguments_get_one_line_before_the_model_loads(capsys, monkeypatch, workspace, tmp_path, argv,
                                                                    expected):  # fmt: skip
    root, _ = workspace
    monkeypatch.setattr(cvt_fast.CvtForImageClassification, "from_pretrained", lambda *a, **k: pytest.fail(LOADING))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "blank.txt").write_text("\n \t\n\n")
    (tmp_path / "list.txt").write_text(f"{root}/images/img01.jpg\n{tmp_path}/named.jsonl\n")
    fill = {"root": root, "tmp": tmp_path}
    status, out, err = classify(capsys, "--model", root / "ckpt", *[a.format(**fill) for a in argv])
    assert status == 2 and out == []
    assert len(err) == 1 and err[0].startswith("cvt-fast classify: " + expected.format(**fill)), err


# ---- torchrun -------------------------------------------------------------------------------------------------


def torchrun_command() -> list[str]:
    """torchrun as the README's user types it: the console script beside this interpreter, else its module."""
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def torchrun(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the kernels are not what these runs exercise
    return subprocess.run(
        [*torchrun_command(), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
    )  # fmt: skip


def test_two_processes_under_torchrun_agree_with_one(capsys, workspace, expected, tmp_path):
    root, readable = workspace
    single = tmp_path / "single.jsonl"
    assert classify(capsys, *dataset_args(root, single, "--workers", "0"))[0] == 0
    output = tmp_path / "two.jsonl"
    args = dataset_args(root, output, "--workers", "1", "--batch-size", "2")
    result = torchrun("--nproc_per_node", "2", "-m", "cvt_fast", "classify", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = read_records(output)
    assert_complete_and_right(records, root, readable, expected)
    for mine, theirs in zip(records, read_records(single), strict=True):
        assert mine.get("labels") == theirs.get("labels") and mine.get("error") == theirs.get("error")
        assert np.allclose(mine.get("scores", []), theirs.get("scores", []), rtol=0, atol=2e-6)
    summary = result.stdout.splitlines()
    assert summary[0] == f"{output}: 13 images, 10 classified, 3 unreadable (one line each, sorted by path)"
    # 13 images done once in all: the shards did not overlap (an overlap would say 14 or more)
    assert [line for line in summary if line.startswith("this run: ")][0].startswith("this run: 13 images in ")
    assert "on 2 process(es)" in summary[5]
    assert "rank 0 of 2: 6/6 images" in result.stderr  # rank 0's half of the odd count


def test_a_refusal_on_one_rank_is_printed_once_by_rank_0_and_every_rank_exits_2(capsys, workspace, tmp_path):
    root, _ = workspace
    output = tmp_path / "results.jsonl"
    args = dataset_args(root, output, "--workers", "0", "--overwrite")
    assert classify(capsys, *args)[0] == 0
    (tmp_path / "results.jsonl.parts" / "rank-1.jsonl").mkdir()  # where rank 1, and only rank 1, must write
    result = torchrun("--nproc_per_node", "2", "-m", "cvt_fast", "classify", *args, cwd=tmp_path)
    ours = [line for line in result.stderr.splitlines() if line.startswith("cvt-fast classify: ")]
    assert ours == [
        f"cvt-fast classify: rank 1: argument --output: cannot write {output}.parts/rank-1.jsonl ([Errno 21] Is a "
        f"directory: '{output}.parts/rank-1.jsonl')"
    ]
    # torchrun's report of both ranks: each exits with 2, unless torchrun stops it first, having seen the other exit
    # (rank 0 prints before any rank leaves, so the line above is there either way)
    codes = sorted(line.split(":")[1].split()[0] for line in result.stderr.splitlines() if "exitcode  :" in line)
    assert codes in (["2", "2"], ["-15", "2"]) and result.returncode == 1, result.stderr


SLOW_CLASSIFY = str(Path(__file__).resolve().parent / "support" / "slow_classify.py")


def test_a_run_whose_rank_was_killed_resumes_to_the_same_output(capsys, workspace, expected, tmp_path):
    root, readable = workspace
    output = tmp_path / "results.jsonl"
    args = dataset_args(root, output, "--workers", "1", "--batch-size", "1")
    command = [*torchrun_command(), "--nproc_per_node", "2", SLOW_CLASSIFY, "--batch-delay", "0.3",
               "--pid-dir", str(tmp_path), "classify", *map(str, args)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = tmp_path / "results.jsonl.parts" / "rank-1.jsonl"
    deadline = time.monotonic() + 120
    while not (part.exists() and part.read_text().count("\n") >= 2):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGKILL)  # rank 1 dies; torchrun then stops rank 0
    run.communicate(timeout=120)
    assert run.returncode != 0 and not output.exists()
    done_before = sum(p.read_text().count("\n") for p in part.parent.glob("rank-*.jsonl"))
    assert 2 <= done_before < 13

    result = torchrun("--nproc_per_node", "2", "-m", "cvt_fast", "classify", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_complete_and_right(read_records(output), root, readable, expected)
    this_run = [line for line in result.stdout.splitlines() if line.startswith("this run: ")][0]
    assert this_run.startswith(f"this run: {13 - done_before} images in ")
    assert this_run.endswith(f"; {done_before} done by an earlier run")


def readme_command() -> str:
    """The multi-process command of docs/classification.md (its first torchrun line)."""
    section = (ROOT / "docs" / "classification.md").read_text().split("## A folder of images into a results file", 1)[1]
    return next(line for line in section.splitlines() if line.startswith("torchrun "))


def test_the_documented_torchrun_command_runs_as_written(workspace, tmp_path):
    root, readable = workspace
    words = readme_command().split()
    # It names ./checkpoint and ./images: made here, in the working directory it runs in.
    shutil.copytree(root / "ckpt", tmp_path / "checkpoint")
    shutil.copytree(root / "images", tmp_path / "images")
    assert words[:3] == ["torchrun", "--nproc_per_node", "2"] and words[words.index("--model") + 1] == "./checkpoint"
    result = torchrun(*words[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr  # nothing a user would take for a problem
    source, output = words[words.index("--input") + 1], words[words.index("--output") + 1]
    records = read_records(tmp_path / output)
    assert [r["path"] for r in records] == sorted(os.path.join(source, name) for name in [*readable, *UNREADABLE])
    assert result.stdout.splitlines()[0] == f"{output}: 13 images, 10 classified, 3 unreadable (one line each, " \
        "sorted by path)"  # fmt: skip


def test_ctrl_c_says_how_far_the_run_got_and_the_same_command_goes_on(workspace, tmp_path):
    """A Ctrl-C (SIGINT) midway: exit status 130 and one line saying how many images are done and that the same
    command goes on; then that command finishes the run."""
    root, readable = workspace
    output = tmp_path / "results.jsonl"
    argv = ["classify", "--model", str(root / "ckpt"), "--input", str(root / "images"), "--output", str(output),
            "--batch-size", "1", "--workers", "0"]  # fmt: skip
    process = subprocess.Popen(  # each image takes a while to decode, so that the interrupt lands midway
        [sys.executable, SLOW_CLASSIFY, "--decode-delay", "0.2", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    part = Path(f"{output}.parts") / "rank-0.jsonl"
    deadline = time.monotonic() + 120
    while not (part.is_file() and len(part.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    done = len(read_records(part))
    total = len(readable) + len(UNREADABLE)
    assert 2 <= done < total
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"cvt-fast classify: interrupted: (\d+) of {total} images are classified \(kept in {re.escape(str(output))}"
        rf"\.parts\); the same command classifies the other \d+ and writes {re.escape(str(output))}",
        last,
    ), last
    assert int(re.search(r"interrupted: (\d+)", last).group(1)) == done
    resumed = subprocess.run([sys.executable, "-m", "cvt_fast", *argv], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(read_records(output)) == total


def test_more_loader_workers_than_cores_is_said_once_not_per_process(workspace, tmp_path):
    """Two processes with --workers set above the machine's cores: rank 0 notes it once, with the numbers; PyTorch's
    own warning (twice in every process) is not repeated."""
    root, _ = workspace
    workers = 2 * (os.cpu_count() or 1)
    arguments = ["--model", root / "ckpt", "--input", root / "images", "--output", tmp_path / "out.jsonl"]
    result = torchrun(
        "--nproc_per_node", "2", "-m", "cvt_fast", "classify", *arguments, "--workers", workers, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "UserWarning" not in result.stderr, result.stderr
    notes = [line for line in result.stderr.splitlines() if "decoding process(es)" in line]
    assert notes == [
        f"note: {workers} decoding process(es) in each of 2 model process(es) share {len(os.sched_getaffinity(0))} "
        "cores with the models; the summary says how many are busy"
    ], result.stderr
