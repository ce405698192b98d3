"""Bad inputs get an error that says what is wrong and what was expected."""

import numpy as np
import pytest
import torch

from cvt_fast import CvtConfig, CvtForImageClassification, CvtModel

pytestmark = pytest.mark.unit

CONFIG = dict(depth=[1, 1], embed_dim=[8, 16], num_heads=[1, 2], cls_token=[False, True], num_labels=3)


@pytest.fixture(scope="module")
def model():
    return CvtForImageClassification(CvtConfig(**CONFIG)).eval()


@pytest.mark.parametrize(
    "pixel_values, error, message",
    [
        (None, ValueError, "specify pixel_values"),
        (np.zeros((1, 3, 32, 32), dtype=np.float32), TypeError, "must be a torch.Tensor .* got ndarray"),
        (torch.randn(3, 32, 32), ValueError, r"4 dimensions .* got shape \(3, 32, 32\) .*unsqueeze\(0\)"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point .* torch.uint8"),
        (torch.randn(1, 4, 32, 32), ValueError, r"4 channels, but the model expects num_channels=3"),
        (torch.randn(1, 3, 7, 32), ValueError, r"7x32 pixels is smaller than the model's total stride: .* at least 8"),
        (torch.randn(0, 3, 32, 32), ValueError, "batch size 0"),
        (
            torch.randn(1, 3, 32, 32, dtype=torch.float64),
            TypeError,
            "torch.float64 but the model's weights are torch.float32",
        ),
    ],
)
def test_bad_pixel_values(model, pixel_values, error, message):
    with pytest.raises(error, match=message):
        model(pixel_values)


def test_image_too_small_for_a_qkv_kernel():
    config = CvtConfig(**{**CONFIG, "kernel_qkv": [3, 5], "padding_q": [1, 2], "padding_kv": [1, 0]})
    with pytest.raises(
        ValueError, match="stage 1 has a 4x4 token grid, smaller than its q/k/v kernel \\(5\\) with padding_kv 0"
    ):
        CvtModel(config)(torch.randn(1, 3, 32, 32))


def test_same_checks_on_the_backbone():
    with pytest.raises(ValueError, match="expects num_channels=3"):
        CvtModel(CvtConfig(**CONFIG))(torch.randn(2, 1, 32, 32))


def test_autocast_allows_a_dtype_mismatch(model):
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)


@pytest.mark.parametrize(
    "problem_type, labels, error, message",
    [
        ("single_label_classification", torch.tensor([0.0, 1.0]), TypeError, "integer class indices"),
        ("single_label_classification", torch.tensor([0, 1, 2]), ValueError, r"shape \(2,\), got \(3,\)"),
        ("single_label_classification", torch.tensor([0, 3]), ValueError, r"in \[0, 3\) .* got \[3\]"),
        ("multi_label_classification", torch.tensor([[0, 1, 1], [1, 0, 0]]), TypeError, "float targets"),
        ("multi_label_classification", torch.rand(2, 2), ValueError, r"shape \(2, 3\), got \(2, 2\)"),
        ("regression", torch.tensor([[1, 2, 3], [4, 5, 6]]), TypeError, "floating-point labels"),
        ("regression", torch.randn(2), ValueError, r"shape \(2, 3\), got \(2,\)"),
        (None, [0, 1], TypeError, "labels must be a torch.Tensor"),
    ],
)
def test_bad_labels(problem_type, labels, error, message):
    model = CvtForImageClassification(CvtConfig(**CONFIG, problem_type=problem_type)).eval()
    if problem_type is None:
        model.config.problem_type = "single_label_classification"
    with pytest.raises(error, match=message):
        model(torch.randn(2, 3, 32, 32), labels=labels)


def test_ignore_index_is_a_valid_label(model):
    model.config.problem_type = None
    loss = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, -100])).loss
    assert torch.isfinite(loss)


def test_bad_backend_and_config_type():
    with pytest.raises(ValueError, match=r"backend argument is 'fast'; expected one of \('auto', 'eager', 'triton'\)"):
        CvtModel(CvtConfig(**CONFIG), backend="fast")
    with pytest.raises(TypeError, match="config must be a cvt_fast.CvtConfig"):
        CvtModel({"depth": [1]})
