"""The README's quick start runs as written, on what a new user has: a checkpoint folder written by transformers'
save_pretrained (config.json and model.safetensors, no preprocessor_config.json) and an image file. And every
relative link in the README and docs/ leads to a file that exists."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("PIL")
transformers = pytest.importorskip("transformers")


def quick_start_code() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quick_start_runs_on_a_folder_saved_by_transformers(tmp_path):
    from PIL import Image

    config = transformers.CvtConfig(depth=[1, 2, 3], embed_dim=[16, 24, 32], num_heads=[1, 2, 2], num_labels=3)
    config.id2label = {0: "cat", 1: "dog", 2: "bird"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    model = transformers.CvtForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint" / "preprocessor_config.json").exists()
    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (300, 400, 3), generator=rng, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "image.jpg")

    code = quick_start_code()
    assert '"path/to/checkpoint"' in code and '"image.jpg"' in code
    code = code.replace('"path/to/checkpoint"', repr(str(tmp_path / "checkpoint")))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"cat", "dog", "bird"}
    assert "has no preprocessor_config.json; using CvT's default preprocessing" in result.stderr


def cpu_snippet_code() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("On a CPU, for serving", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_cpu_snippet_runs_after_the_quick_start(tmp_path):
    """The README's serving snippet, run after the quick start as a reader would: a package on the fastest engine
    here, in the dtype this CPU runs fastest, that loads back and gives the frozen model's logits."""
    from PIL import Image

    config = transformers.CvtConfig(depth=[1, 2, 3], embed_dim=[16, 24, 32], num_heads=[1, 2, 2], num_labels=3)
    torch.manual_seed(0)
    transformers.CvtForImageClassification(config).eval().save_pretrained(tmp_path / "checkpoint")
    Image.new("RGB", (300, 400), (120, 30, 200)).save(tmp_path / "image.jpg")
    code = quick_start_code().replace('"path/to/checkpoint"', repr(str(tmp_path / "checkpoint")))
    code += cpu_snippet_code()
    code += "print(cvt_fast.load_frozen('cvt.cvt')(inputs.pixel_values.to(frozen.dtype)).logits.equal(logits))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].startswith("FrozenCvt(CvtForImageClassification, pixel_values (") and lines[-1] == "True"
    from cvt_fast.ops.cpu_linear import cpu_has_native_bfloat16

    assert ("bfloat16" if cpu_has_native_bfloat16() else "float32") in lines[1]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped (hyphens and underscores kept),
    spaces as hyphens; a repeated heading gets -1, -2, ..."""
    found: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        anchor, count = slug, 0
        while anchor in found:
            count += 1
            anchor = f"{slug}-{count}"
        found.add(anchor)
    return found


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.name)
def test_relative_links_lead_somewhere(page):
    """Every relative link leads to a file that exists and, when it names an anchor, to a heading of that file."""
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name} links to {target}, but {path.name} has no such heading"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"the README does not link docs/{page.name}"
