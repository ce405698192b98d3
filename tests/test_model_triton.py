"""The whole model on the kernels (backend="triton"): on CUDA, or on CPU tensors in Triton's interpreter, against
transformers (float32, and float64 as the reference of the half-precision rule), under statistics that make every
term of the kernels matter: small BatchNorm variances, a distinct eps per projection, large attention scores."""

import copy

import pytest
import torch

import cvt_fast

from support.helpers import (
    DEVICE,
    FLOORS,
    fused_ops,
    harden_statistics_,
    model_pair,
    random_config_kwargs,
    rel_err,
    valid_image_side,
)

pytestmark = pytest.mark.kernel

pytest.importorskip("triton")

# Small grids keep the interpreter quick; head_dim 32 so that the attention kernel covers every layer.
TINY = dict(
    patch_sizes=[7, 3],
    patch_stride=[4, 2],
    patch_padding=[2, 1],
    embed_dim=[32, 64],
    num_heads=[1, 2],
    depth=[1, 2],
    cls_token=[False, True],
    num_labels=7,
)


def fast_pair(kwargs, seed=0):
    hf, ours = harden_statistics_(model_pair(kwargs, seed=seed), torch.Generator().manual_seed(seed))
    ours.set_backend("triton")
    return hf.to(DEVICE), ours.to(DEVICE)


@pytest.mark.parametrize("size", [(32, 32), (37, 29), (16, 16)])
def test_float32_against_transformers(size):
    hf, ours = fast_pair(TINY)
    x = torch.randn(2, 3, *size, device=DEVICE)
    with torch.no_grad():
        expected, actual = hf(x, output_hidden_states=True), ours(x, output_hidden_states=True)
    assert rel_err(actual.logits, expected.logits) < 2e-5
    for a, e in zip(actual.hidden_states, expected.hidden_states, strict=True):
        assert rel_err(a, e) < 2e-5
    paths = ours.kernel_paths()
    assert len(paths) == 3 and all(
        fused_ops(p) == {"qkv_projection": "triton", "attention": "triton"} for p in paths.values()
    )


@pytest.mark.parametrize("seed", range(3))
def test_random_configs_against_transformers(seed):
    kwargs = random_config_kwargs(seed, stages=2, num_heads=[1, 2], embed_dim=[32, 64], patch_stride=[4, 2])
    hf, ours = fast_pair(kwargs, seed)
    height, width = (next(s for s in range(start, 99) if valid_image_side(kwargs, s)) for start in (33, 27))
    x = torch.randn(1, kwargs["num_channels"], height, width, device=DEVICE)
    with torch.no_grad():
        assert rel_err(ours(x).logits, hf(x).logits) < 2e-5


def test_float16_within_the_rule():
    """Model-level accuracy rule: as close to transformers in float64 as transformers in float16 is (2x, plus the
    float16 floor)."""
    hf, ours = fast_pair(TINY)
    reference_model = copy.deepcopy(hf).double().cpu()
    hf16 = copy.deepcopy(hf).half()
    fast16 = copy.deepcopy(ours).half()
    x = torch.randn(2, 3, 32, 40, device=DEVICE)
    with torch.no_grad():
        reference = reference_model(x.double().cpu()).logits
        eager_err = rel_err(hf16(x.half()).logits.cpu(), reference)
        actual = fast16(x.half()).logits.cpu()
    fast_err = rel_err(actual, reference)
    assert torch.isfinite(actual).all() and fast_err <= 2 * eager_err + FLOORS[torch.float16], (fast_err, eager_err)
    assert all(
        fused_ops(p) == {"qkv_projection": "triton", "attention": "triton"} for p in fast16.kernel_paths().values()
    )


def test_what_the_kernels_do_not_cover_runs_eagerly_with_a_reason():
    kwargs = dict(TINY, qkv_projection_method=["avg", "dw_bn"], embed_dim=[16, 64], num_heads=[1, 2])
    model = cvt_fast.CvtForImageClassification(cvt_fast.CvtConfig(**kwargs), backend="triton").to(DEVICE).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, device=DEVICE))
    stage0 = model.kernel_paths()["cvt.encoder.stages.0.layers.0"]
    assert stage0["qkv_projection"] == "eager: qkv_projection_method 'avg' (only 'dw_bn' is fused)"
    assert stage0["attention"] == "eager: head_dim 16 is outside the kernel's 32..128"
    assert fused_ops(model.kernel_paths()["cvt.encoder.stages.1.layers.0"]) == {
        "qkv_projection": "triton",
        "attention": "triton",
    }


def test_gradients_take_the_eager_path_and_are_right():
    """Eval mode with autograd recording (a saliency map, say): the layers fall back to the eager path, and the
    input gradient is transformers' (compared in float64, where rounding cannot blur a wrong formula)."""
    hf, ours = fast_pair(TINY)
    hf, ours = hf.double(), ours.double()
    x = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=torch.float64, requires_grad=True)
    ours(x).logits.sum().backward()
    expected_x = x.detach().clone().requires_grad_()
    hf(expected_x).logits.sum().backward()
    assert rel_err(x.grad, expected_x.grad) < 1e-10
    assert all(p["attention"].startswith("eager: autograd") for p in ours.kernel_paths().values())


def test_training_mode_without_autograd_takes_the_eager_path():
    """train() under no_grad (a BatchNorm statistics refresh, say): the kernels fold the running statistics, which
    training must not use, so the layers run eagerly on batch statistics and update the running ones, as
    transformers does (float32, which the kernels would take: a wrong path is a BatchNorm on other statistics).
    Back in eval mode, the kernels fold the updated statistics (which the update did not mark as changed), not
    those of the eval forward before training."""
    hf, ours = fast_pair(dict(TINY, drop_path_rate=[0.0, 0.0]))
    x = torch.randn(4, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        ours(x)  # an eval forward first, on the kernels
        hf, ours = hf.train(), ours.train()
        expected, actual = hf(3.0 * x + 1.0).logits, ours(3.0 * x + 1.0).logits
    assert rel_err(actual, expected) < FLOORS[torch.float32]
    for (name, theirs), mine in zip(hf.state_dict().items(), ours.state_dict().values(), strict=True):
        assert rel_err(mine.double(), theirs.double()) < FLOORS[torch.float32], name  # running statistics alike
    assert all(p["attention"].startswith("eager: training") for p in ours.kernel_paths().values())
    hf, ours = hf.eval(), ours.eval()
    with torch.no_grad():
        assert rel_err(ours(x).logits, hf(x).logits) < 2e-5
    assert all(
        fused_ops(p) == {"qkv_projection": "triton", "attention": "triton"} for p in ours.kernel_paths().values()
    )


@pytest.mark.gpu
def test_auto_runs_the_kernels_on_cuda_in_eval_mode():
    hf, ours = model_pair(TINY)
    ours.set_backend("auto")
    hf, ours = hf.cuda(), ours.cuda()
    x = torch.randn(2, 3, 64, 48, device="cuda")
    with torch.no_grad():
        assert rel_err(ours(x).logits, hf(x).logits) < 2e-5
    assert all(
        fused_ops(p) == {"qkv_projection": "triton", "attention": "triton"} for p in ours.kernel_paths().values()
    )
