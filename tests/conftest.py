"""Shared test setup. Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before triton is first imported, so it happens here, ahead of every test module."""

import getpass
import os
import tempfile

# torch.compile's on-disk cache (inductor's) is not keyed by the CPU capability: code compiled for AVX-512 is served to
# a run forced to ATEN_CPU_CAPABILITY=avx2 on the same machine (NaN logits, or a crash). Such a run, which is how the
# suite checks what an AVX2-only CPU gets, uses a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    capability = os.environ["ATEN_CPU_CAPABILITY"].lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{capability}"
    )

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:  # float32 checks against transformers and float64 hold float32 to its own accuracy, not TF32's
    from cvt_fast.testing import float32_without_tf32

    float32_without_tf32()


TIERS = ("unit", "kernel", "integration", "ecosystem")  # pyproject.toml says what each holds


def pytest_collection_modifyitems(config, items):
    untiered = sorted({item.nodeid.split("::")[0] for item in items if not any(t in item.keywords for t in TIERS)})
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {', '.join(untiered)}")
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
