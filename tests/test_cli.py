"""The command line, run as a user would: a subprocess on real files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cvt_fast.testing import randomize_

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

LABELS = {0: "tabby cat", 1: "golden retriever", 2: "teapot", 3: "volcano"}


def run_cli(*args, env=None, cwd=None):
    """As a user runs it, from a directory of their own (not the repository root, see conftest)."""
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
    result = run_cli(
        "bench",
        "--models",
        str(config_path),
        "--sizes",
        "48",
        "--batches",
        "2",
        "--rounds",
        "2",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "cvt_fast-eager is" in result.stdout and "within" in result.stdout
    records = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {r["implementation"] for r in records} == {"transformers-eager", "cvt_fast-eager"}
    for r in records:
        assert r["images_per_s"] > 0 and r["max_err"] < 1e-4 and r["batch"] == 2 and r["image_size"] == 48
    assert "| cvt_fast-eager |" in (tmp_path / "out" / "bench.md").read_text()


def test_bench_refuses_to_time_kernels_under_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = run_cli("bench", "--implementations", "cvt_fast-triton", "--device", "cpu", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "timings of kernels under the Triton interpreter mean nothing" in result.stderr
    assert "Traceback" not in result.stderr
