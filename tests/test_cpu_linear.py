"""Linear layers on the CPU: oneDNN's matrix product on a prepacked weight for inference in float32 and bfloat16,
as accurate as F.linear against a float64 definition, following in-place edits of the weight, and F.linear itself
wherever autograd (training) or a compiler is involved."""

import pytest
import torch
import torch.nn.functional as F

from cvt_fast import dispatch, ops
from cvt_fast.modeling import CvtLinear

from helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


def definition(x, weight, bias):
    return x.double() @ weight.double().T + bias.double()


@pytest.mark.parametrize("dtype, floor", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("shape", [(8, 197, 384), (3, 1, 64), (25088, 64)], ids=str)
def test_as_accurate_as_f_linear_against_float64(shape, dtype, floor):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator).to(dtype)
    weight = torch.randn(96, shape[-1], generator=generator).to(dtype) / shape[-1] ** 0.5
    bias = torch.randn(96, generator=generator).to(dtype)
    with torch.inference_mode():
        assert dispatch.use_onednn_linear(x, weight)
        actual = ops.linear(x, weight, bias)
    expected = definition(x, weight, bias)
    assert actual.shape == (*shape[:-1], 96) and actual.dtype == dtype
    assert rel_err(actual, expected) <= 2 * rel_err(F.linear(x, weight, bias), expected) + floor


def test_in_place_edits_of_the_weight_reach_the_next_call():
    layer = CvtLinear(64, 32).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        for edit in (lambda: layer.weight.mul_(3.0), lambda: layer.weight.add_(0.5), lambda: layer.bias.sub_(1.0)):
            before = layer(x)
            edit()
            after = layer(x)
            assert rel_err(after, definition(x, layer.weight, layer.bias)) < 1e-5
            assert rel_err(before, after) > 1e-2
        layer.load_state_dict({"weight": torch.randn(32, 64), "bias": torch.randn(32)})
        assert rel_err(layer(x), definition(x, layer.weight, layer.bias)) < 1e-5


def test_autograd_training_and_compilers_keep_f_linear(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(ops.torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    layer = CvtLinear(16, 8)
    x = torch.randn(4, 16)
    layer.train()(x).sum().backward()  # training: gradients flow through F.linear
    assert layer.weight.grad is not None and calls == []
    layer.eval()(x)  # eval, but autograd records (the weight requires grad): F.linear
    assert calls == []
    with torch.no_grad():
        layer(x)
        assert calls == [1]
        monkeypatch.setenv(dispatch.ONEDNN_LINEAR_VAR, "0")
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and calls == [1]
        monkeypatch.delenv(dispatch.ONEDNN_LINEAR_VAR)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert rel_err(compiled(x), definition(x, layer.weight, layer.bias)) < 1e-5 and calls == [1]
    assert not dispatch.use_onednn_linear(x.double(), layer.weight.double())  # float64: F.linear


@pytest.mark.parametrize("out_features, in_features, rows", [(0, 8, 5), (4, 0, 5), (4, 8, 0)])
def test_empty_products_give_what_f_linear_gives(out_features, in_features, rows):
    """A zero-width MLP (mlp_ratio 0, which transformers accepts) or an empty batch: oneDNN has no such product."""
    layer = CvtLinear(in_features, out_features).eval()
    x = torch.randn(2, rows, in_features)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_cpu_autocast_casts_as_it_casts_f_linear():
    """Under torch.autocast("cpu", bfloat16) a float32 layer computes in bfloat16, as transformers' nn.Linear does."""
    layer = CvtLinear(64, 32).eval()
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        actual, expected = layer(x), F.linear(x, layer.weight, layer.bias)
    assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected)
