"""Shared test setup. Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before triton is first imported, so it happens here, ahead of every test module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:  # float32 checks against transformers and float64 hold float32 to its own accuracy, not TF32's
    from cvt_fast.testing import float32_without_tf32

    float32_without_tf32()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
