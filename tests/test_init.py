"""Weight initialisation against transformers': a model trained from scratch must start where transformers' does.

Not bit for bit: transformers' own random stream differs between its releases (4.x draws one truncated normal per
weight, children before parents; 5.x draws a normal and then a truncated normal, and initialises the backbone before
the head exists), so bitwise equality would hold for one release only. Instead every tensor is held to what
transformers gives it: the same constants exactly (zero biases, unit LayerNorm and BatchNorm, BatchNorm statistics
reset), and for Linear/Conv2d weights and cls tokens a normal of std initializer_range truncated at +-2 (absolute:
torch.nn.init.trunc_normal_'s default bounds), checked against that definition and against transformers' tensor.
With initializer_range 1.0 the truncation cuts at 2 sigma, so a plain normal, PyTorch's default uniform or another
std shows."""

import math

import pytest
import torch

import cvt_fast
from cvt_fast.testing import randomize_

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

# Both cls tokens on: transformers sizes every cls token by the last width, a wrong shape for stage 0 but a sample of
# the same distribution, which is all this compares.
CONFIG = dict(
    depth=[1, 2], embed_dim=[24, 48], num_heads=[1, 2], cls_token=[True, True], num_labels=7,
    patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1],
)  # fmt: skip


def truncated_normal_std(std: float, bound: float = 2.0) -> float:
    """The standard deviation of N(0, std^2) truncated to [-bound, bound], from the definition."""
    a = bound / std
    density = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))  # P(|z| < a)
    return std * math.sqrt(1 - 2 * a * density / mass)


def within_sampling_error(values: torch.Tensor, std: float) -> str | None:
    """None if `values` look like a sample of a zero-mean law of standard deviation `std`: mean and sample std within
    5 standard errors. The seeds are fixed, so the outcome is too; the margin makes a false alarm about a one in a
    million chance for whatever seed, while a doubled std fails even the smallest tensor here (24 values)."""
    n = values.numel()
    if abs(values.mean().item()) > 5 * std / math.sqrt(n):
        return f"mean {values.mean().item():.4g}, expected 0 +- {5 * std / math.sqrt(n):.2g}"
    if abs(values.std().item() / std - 1) > 5 / math.sqrt(2 * n):
        return f"std {values.std().item():.4g}, expected {std:.4g} within {5 / math.sqrt(2 * n):.0%}"
    return None


@pytest.mark.parametrize("initializer_range", [0.02, 1.0])
@pytest.mark.parametrize("head", [True, False], ids=["classifier", "backbone"])
def test_every_tensor_starts_as_in_transformers(initializer_range, head):
    kwargs = dict(CONFIG, initializer_range=initializer_range)
    hf_class = transformers.CvtForImageClassification if head else transformers.CvtModel
    ours_class = cvt_fast.CvtForImageClassification if head else cvt_fast.CvtModel
    torch.manual_seed(0)
    theirs = hf_class(transformers.CvtConfig(**kwargs)).state_dict()
    torch.manual_seed(0)
    ours = ours_class(cvt_fast.CvtConfig(**kwargs)).state_dict()
    assert list(ours) == list(theirs)

    expected_std = truncated_normal_std(initializer_range)
    random_ours, random_theirs = [], []
    for name, tensor in ours.items():
        reference = theirs[name]
        assert tensor.dtype == reference.dtype, name
        if (reference == reference.flatten()[0]).all():  # a constant in transformers: zeros, ones, step counters
            assert torch.equal(tensor, reference), f"{name}: transformers starts it at {reference.flatten()[0]}"
            continue
        values, reference_values = tensor.double().flatten(), reference.double().flatten()
        assert values.abs().max() <= 2.0, f"{name}: values beyond the truncation at +-2"
        problem = within_sampling_error(values, expected_std)
        assert problem is None, f"{name}: {problem}"
        # The same on transformers' tensor shows that the definition above is what transformers does.
        assert within_sampling_error(reference_values, expected_std) is None, f"transformers' {name}"
        random_ours.append(values)
        random_theirs.append(reference_values)
    # Pooled, the spread is pinned to ~1%: the two libraries draw from one law.
    pooled_ours, pooled_theirs = torch.cat(random_ours), torch.cat(random_theirs)
    assert within_sampling_error(pooled_ours, expected_std) is None
    assert abs(pooled_ours.std().item() / pooled_theirs.std().item() - 1) < 10 / math.sqrt(2 * pooled_ours.numel())


def test_the_truncation_is_there():
    """At initializer_range 1.0 a plain normal would pass 2 in 4.6% of the entries: transformers' and ours touch
    the bound's neighbourhood and never cross it."""
    kwargs = dict(CONFIG, initializer_range=1.0)
    for model in (
        transformers.CvtForImageClassification(transformers.CvtConfig(**kwargs)),
        cvt_fast.CvtForImageClassification(cvt_fast.CvtConfig(**kwargs)),
    ):
        weight = model.cvt.encoder.stages[1].layers[0].intermediate.dense.weight.detach().flatten()
        assert 1.95 < weight.abs().max() <= 2.0, type(model).__module__


@pytest.mark.parametrize("how", ["missing head", "mis-shaped head"])
def test_keys_a_checkpoint_lacks_start_as_in_transformers(tmp_path, how):
    """from_pretrained's strict=False and ignore_mismatched_sizes=True initialise what the checkpoint cannot give
    (here a head) as transformers initialises a fresh model, and keep what it gives."""
    kwargs = dict(CONFIG, initializer_range=1.0)
    if how == "missing head":
        saved = randomize_(cvt_fast.CvtModel(cvt_fast.CvtConfig(**kwargs)))
        saved.save_pretrained(tmp_path)
        model = cvt_fast.CvtForImageClassification.from_pretrained(tmp_path, strict=False)
        kept = model.cvt.state_dict()
    else:
        saved = randomize_(cvt_fast.CvtForImageClassification(cvt_fast.CvtConfig(**dict(kwargs, num_labels=3))))
        saved.save_pretrained(tmp_path)
        model = cvt_fast.CvtForImageClassification.from_pretrained(
            tmp_path, num_labels=kwargs["num_labels"], ignore_mismatched_sizes=True
        )
        kept = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    weight, bias = model.classifier.weight.detach().double().flatten(), model.classifier.bias.detach()
    assert torch.equal(bias, torch.zeros_like(bias))
    assert weight.abs().max() <= 2.0
    problem = within_sampling_error(weight, truncated_normal_std(1.0))
    assert problem is None, problem
    saved_state = saved.state_dict()
    for key, value in kept.items():  # the rest is the checkpoint's, not re-initialised
        assert torch.equal(value, saved_state[key]), key
