"""Scripts run from the repository root have the root on sys.path, where the top-level kernels/ folder (shipped as
cvt_fast.kernels) could pass for PyPI's `kernels` package, which transformers imports to probe for it. Each test runs
a fresh interpreter, as a user's script would."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

pytestmark = pytest.mark.ecosystem

ROOT = Path(__file__).resolve().parent.parent

PATCHED_MODEL_RUNS = """
import json, torch, transformers, cvt_fast
config = transformers.CvtConfig(depth=[1, 2, 3], embed_dim=[16, 24, 32], num_heads=[1, 2, 2], num_labels=4)
model = transformers.CvtForImageClassification(config).eval()
x = torch.randn(2, 3, 48, 40)
with torch.no_grad():
    before = model(x).logits
    cvt_fast.patch(model)
    after = model(x).logits
print(json.dumps({
    "patched_layers": len(cvt_fast.kernel_paths(model)),
    "max_diff": (after - before).abs().max().item(),
    "kernels_available": transformers.utils.is_kernels_available(),
}))
"""


def installed_kernels_package(tmp_path: Path) -> str | None:
    """Where PyPI's `kernels` is installed in this environment (transformers >= 5.25 depends on it), or None: asked
    from a folder without a kernels/ of its own."""
    code = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)"
    origin = run_python(code, cwd=tmp_path).stdout.strip()
    return None if origin == "None" else origin


def run_python(code: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("how", ["working directory", "script beside kernels/"])
def test_transformers_imports_and_a_patched_model_runs(how, tmp_path):
    # `python -c` from the root puts "" on sys.path; `python script.py` in the root puts the root's absolute path.
    if how == "working directory":
        result = run_python(PATCHED_MODEL_RUNS, cwd=ROOT)
    else:
        result = run_python(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + PATCHED_MODEL_RUNS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["patched_layers"] == 6 and report["max_diff"] < 1e-4
    # transformers finds PyPI's kernels package exactly when it is installed, never the repository's folder
    assert report["kernels_available"] is (installed_kernels_package(tmp_path) is not None)


def test_nothing_of_cvt_fast_is_importable_as_kernels(tmp_path):
    """From the root, `import kernels` gives PyPI's package where it is installed, else an empty stand-in; never
    the repository's folder or any of its modules."""
    code = """
import importlib, json, kernels
try:
    submodule = importlib.import_module("kernels.attention").__file__
except ModuleNotFoundError as error:
    submodule = str(error)
import cvt_fast.kernels
print(json.dumps({
    "file": getattr(kernels, "__file__", None),
    "version": getattr(kernels, "__version__", None),
    "public": [name for name in dir(kernels) if not name.startswith("_")],
    "submodule": submodule,
    "real_package": [cvt_fast.kernels.__name__, hasattr(cvt_fast.kernels, "flash_attention")],
}))
"""
    result = run_python(code, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    installed = installed_kernels_package(tmp_path)
    if installed is None:
        assert report["file"] is None and report["version"] is None and report["public"] == []
        assert report["submodule"] == "No module named 'kernels.attention'"
    else:
        assert report["file"] == installed and report["version"] is not None
        assert not str(report["submodule"]).startswith(str(ROOT))
    assert report["real_package"] == ["cvt_fast.kernels", True]


def test_an_installed_kernels_package_is_what_import_kernels_gives(tmp_path):
    """With PyPI's `kernels` installed, the folder must not hide it: `import kernels` in the root gives the package."""
    package = tmp_path / "site" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0.0.1"\nORIGIN = "installed"\n')
    (package / "layer.py").write_text("NAME = 'layer of the installed package'\n")
    code = "import kernels, kernels.layer; print(kernels.ORIGIN, kernels.__version__, kernels.layer.NAME, sep='|')"
    result = run_python(code, cwd=ROOT, pythonpath=str(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "installed|0.0.1|layer of the installed package"


def test_the_folder_under_another_package_name_refuses_with_a_reason(tmp_path):
    # e.g. the clone's parent directory on sys.path: the folder would load as `<clone>.kernels`
    (tmp_path / "clone").symlink_to(ROOT, target_is_directory=True)
    result = run_python("import clone.kernels", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: clone.kernels: the repository's kernels/ folder is the package cvt_fast.kernels; import that"
    )
