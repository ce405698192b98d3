"""patch / unpatch / from_transformers on transformers models a user already holds."""

import copy

import pytest
import torch

import cvt_fast
from cvt_fast.modeling import CvtSelfAttention
from cvt_fast.testing import randomize_

from support.helpers import DEVICE, fused_ops, harden_statistics_, rel_err

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

CONFIG = dict(
    patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], embed_dim=[32, 64], num_heads=[1, 2],
    depth=[1, 2], cls_token=[False, True], num_labels=5,
)  # fmt: skip


@pytest.fixture
def hf_model():
    model = transformers.CvtForImageClassification(transformers.CvtConfig(**CONFIG))
    return randomize_(model, torch.Generator().manual_seed(0)).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_patch_in_place_and_undo(hf_model):
    x = torch.randn(2, 3, 40, 36)
    before = logits(hf_model, x)
    keys = list(hf_model.state_dict())
    same = cvt_fast.patch(hf_model, backend="eager")
    assert same is hf_model and isinstance(hf_model, transformers.CvtForImageClassification)
    layers = [m for m in hf_model.modules() if isinstance(m, CvtSelfAttention)]
    assert len(layers) == 3
    assert list(hf_model.state_dict()) == keys  # same keys: save_pretrained and checkpoints unaffected
    assert rel_err(logits(hf_model, x), before) < 2e-5
    assert set(cvt_fast.kernel_paths(hf_model)) == {
        "cvt.encoder.stages.0.layers.0",
        "cvt.encoder.stages.1.layers.0",
        "cvt.encoder.stages.1.layers.1",
    }
    cvt_fast.unpatch(hf_model)
    assert not any(isinstance(m, CvtSelfAttention) for m in hf_model.modules())
    assert torch.equal(logits(hf_model, x), before)
    with pytest.raises(ValueError, match="was not patched"):
        cvt_fast.unpatch(hf_model)


# Hyperparameters that differ between q and k/v and between stages, so that a patched layer built from the wrong
# one of them shows; dropout, so that training through the patch must draw the random numbers the original draws.
AWKWARD = dict(
    patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], embed_dim=[32, 48], num_heads=[1, 3],
    depth=[1, 2], cls_token=[False, True], num_labels=5, kernel_qkv=[3, 5], padding_q=[1, 2], padding_kv=[0, 1],
    stride_kv=[2, 1], qkv_bias=[False, True], attention_drop_rate=[0.1, 0.2], drop_rate=[0.0, 0.1],
)  # fmt: skip


@pytest.fixture
def awkward_pair():
    """(model, untouched copy): a transformers model with small BatchNorm variances, and a different eps and momentum
    for every BatchNorm (module attributes, in no state dict: a patch must carry them over)."""
    model = transformers.CvtForImageClassification(transformers.CvtConfig(**AWKWARD))
    randomize_(model, torch.Generator().manual_seed(1))
    harden_statistics_([model], torch.Generator().manual_seed(1))
    for i, module in enumerate(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        module.momentum = 0.05 + 0.02 * i
    return model, copy.deepcopy(model)


def _train_step(model, x, seed):
    """A seeded training step in float64: logits, every gradient, and every buffer after it."""
    model.train()
    torch.manual_seed(seed)
    out = model(x, labels=torch.tensor([1, 4]))
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.logits.detach(), grads, {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("how", ["patch", "from_transformers"])
def test_patched_model_computes_what_the_original_did(awkward_pair, how):
    model, original = awkward_pair
    fast = cvt_fast.patch(model, backend="eager") if how == "patch" else cvt_fast.from_transformers(model, "eager")
    x = torch.randn(2, 3, 45, 38)
    assert rel_err(logits(fast.eval(), x), logits(original.eval(), x)) < 2e-5  # eval: BatchNorm folded
    # Training in float64, where rounding cannot hide a difference: dropout masks, BatchNorm on batch statistics,
    # gradients, and running statistics moved by each BatchNorm's own momentum.
    fast, original, x = fast.double(), original.double(), x.double()
    expected_logits, expected_grads, expected_buffers = _train_step(original, x, seed=5)
    actual_logits, actual_grads, actual_buffers = _train_step(fast, x, seed=5)
    assert rel_err(actual_logits, expected_logits) < 1e-12
    largest = max(g.abs().max().item() for g in expected_grads.values())  # model-wide: some are zero in exact math
    for name, grad in expected_grads.items():
        assert (actual_grads[name] - grad).abs().max() <= 1e-10 * largest, name
    for name, buffer in expected_buffers.items():
        assert torch.allclose(actual_buffers[name], buffer, rtol=1e-12, atol=0), name


def test_patched_layers_share_the_weights(hf_model):
    query = hf_model.cvt.encoder.stages[1].layers[0].attention.attention.projection_query.weight
    cvt_fast.patch(hf_model)
    fast_query = hf_model.cvt.encoder.stages[1].layers[0].attention.attention.projection_query.weight
    assert fast_query is query
    hf_model.train()
    hf_model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 4])).loss.backward()
    assert query.grad is not None and query.grad.abs().sum() > 0  # training through the patch reaches the originals


def test_patch_runs_the_kernels(hf_model):
    pytest.importorskip("triton")
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    hf_model.to(DEVICE)
    before = logits(hf_model, x)
    cvt_fast.patch(hf_model, backend="triton")
    after = logits(hf_model, x)
    assert rel_err(after, before) < 2e-5
    assert all(
        fused_ops(p) == {"qkv_projection": "triton", "attention": "triton"}
        for p in cvt_fast.kernel_paths(hf_model).values()
    )


def test_patching_again_changes_the_backend(hf_model):
    cvt_fast.patch(hf_model, backend="eager")
    cvt_fast.patch(hf_model, backend="auto")
    assert {m.backend for m in hf_model.modules() if isinstance(m, CvtSelfAttention)} == {"auto"}
    cvt_fast.unpatch(hf_model)
    assert not any(isinstance(m, CvtSelfAttention) for m in hf_model.modules())


def test_from_transformers_returns_a_cvt_fast_model(hf_model):
    fast = cvt_fast.patch(hf_model, inplace=False, backend="eager")
    assert isinstance(fast, cvt_fast.CvtForImageClassification) and not fast.training
    assert fast.config.embed_dim == [32, 64] and fast.config.num_labels == 5
    x = torch.randn(2, 3, 37, 41)
    assert rel_err(logits(fast, x), logits(hf_model, x)) < 2e-5
    assert fast.classifier.weight is hf_model.classifier.weight
    assert not any(isinstance(m, CvtSelfAttention) for m in hf_model.modules())  # the original is untouched
    backbone = cvt_fast.from_transformers(hf_model.cvt)
    assert isinstance(backbone, cvt_fast.CvtModel)


def test_refusals():
    with pytest.raises(TypeError, match="contains no transformers CvtSelfAttention"):
        cvt_fast.patch(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="expected a transformers CvtModel or CvtForImageClassification"):
        cvt_fast.from_transformers(torch.nn.Linear(3, 3))


def test_unpatch_after_moving_and_training_keeps_everything(hf_model):
    cvt_fast.patch(hf_model, backend="eager")
    hf_model.double().train()
    hf_model(torch.randn(2, 3, 32, 32, dtype=torch.float64))  # BatchNorm running statistics move
    expected = {k: v.clone() for k, v in hf_model.state_dict().items()}
    cvt_fast.unpatch(hf_model)
    hf_model.eval()
    for key, value in hf_model.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    hf_model(torch.randn(1, 3, 32, 32, dtype=torch.float64))  # and the original layers run on them


def test_hooks_on_the_swapped_layers_keep_running(hf_model):
    calls = []
    layer = hf_model.cvt.encoder.stages[0].layers[0].attention.attention
    layer.register_forward_hook(lambda module, args, out: calls.append(type(module).__module__))
    cvt_fast.patch(hf_model)
    logits(hf_model, torch.randn(1, 3, 32, 32))
    cvt_fast.unpatch(hf_model)
    logits(hf_model, torch.randn(1, 3, 32, 32))
    assert calls == ["cvt_fast.modeling", "transformers.models.cvt.modeling_cvt"]
