"""Linear layers on the CPU: oneDNN's matrix product for inference in float32, and in bfloat16 where the CPU has it
natively; F.linear, with the reason in kernel_paths(), wherever oneDNN cannot or must not run (a CPU without native
bfloat16, autograd, compilers, autocast). Accuracy against a float64 definition; no copy of the weight is kept, so
every edit (through .data too, as peft's LoRA merge makes) reaches the next call."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import cvt_fast
from cvt_fast import ops
from cvt_fast.modeling import CvtLinear
from cvt_fast.ops import cpu_linear

from support.helpers import rel_err

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)"),
]

NATIVE_BF16 = cpu_linear.cpu_has_native_bfloat16()


def definition(x, weight, bias):
    return x.double() @ weight.double().T + bias.double()


@pytest.mark.parametrize("dtype, floor", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("shape", [(8, 197, 384), (3, 1, 64), (25088, 64)], ids=str)
def test_as_accurate_as_f_linear_against_float64(shape, dtype, floor):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator).to(dtype)
    weight = torch.randn(96, shape[-1], generator=generator).to(dtype) / shape[-1] ** 0.5
    bias = torch.randn(96, generator=generator).to(dtype)
    route = ops.LinearRoute()
    with torch.inference_mode():
        actual = ops.linear(x, weight, bias, route)
    onednn = dtype == torch.float32 or NATIVE_BF16
    assert (route.taken == "onednn") == onednn, route.taken
    expected = definition(x, weight, bias)
    assert actual.shape == (*shape[:-1], 96) and actual.dtype == dtype
    assert rel_err(actual, expected) <= 2 * rel_err(F.linear(x, weight, bias), expected) + floor


def test_bfloat16_without_native_support_takes_f_linear_and_says_why(monkeypatch):
    """On a CPU without native bfloat16 (AVX2 only), oneDNN's bfloat16 product raises; the capability check is
    forced here, so that the fallback is exercised on any CPU."""
    monkeypatch.setattr(cpu_linear, "cpu_has_native_bfloat16", lambda: False)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    layer = CvtLinear(64, 32).eval().to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.inference_mode():
        actual = layer(x)
    assert calls == [] and layer.route.taken.startswith("F.linear: bfloat16 on a CPU without native bfloat16")
    assert torch.equal(actual, F.linear(x, layer.weight, layer.bias))
    with torch.inference_mode():
        layer.float()(x.float())
    assert calls == [1] and layer.route.taken == "onednn"  # float32 is unaffected


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ONEDNN_MAX_CPU_ISA caps x86 ISAs")
def test_a_bfloat16_model_runs_where_onednn_is_capped_at_avx2(tmp_path):
    """The real refusal, on any x86 CPU: with oneDNN capped at AVX2 its bfloat16 linear raises, so a bfloat16 model
    must take F.linear there, be as close to float64 as transformers' bfloat16 model is (2x its error + 1e-2), and say
    why."""
    script = textwrap.dedent(
        """
        import torch, cvt_fast
        from cvt_fast.ops import cpu_linear
        assert not cpu_linear.cpu_has_native_bfloat16()
        try:
            torch.ops.mkldnn._linear_pointwise(torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16(), None,
                                               "none", [], "")
            print("REFUSED no")
        except RuntimeError:
            print("REFUSED yes")
        torch.manual_seed(0)
        config = cvt_fast.CvtConfig(num_labels=3, embed_dim=[16, 24], num_heads=[2, 3], depth=[1, 2],
                                    num_channels=3, patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1],
                                    kernel_qkv=[3, 3], padding_q=[1, 1], padding_kv=[1, 1], stride_kv=[2, 2],
                                    stride_q=[1, 1], cls_token=[False, True], mlp_ratio=[4.0, 4.0],
                                    qkv_bias=[True, True], drop_path_rate=[0.0, 0.0])
        model = cvt_fast.CvtForImageClassification(config).eval()
        theirs = cvt_fast.tools.models.transformers_twin(model).eval()
        x = torch.randn(2, 3, 32, 40)
        with torch.inference_mode():
            reference = model.double()(x.double()).logits
            half = model.to(torch.bfloat16)(x.to(torch.bfloat16)).logits
            their_half = theirs.to(torch.bfloat16)(x.to(torch.bfloat16)).logits
        error = lambda out: ((out.double() - reference).abs().max() / reference.abs().max()).item()
        print("ERROR", error(half))
        print("THEIRS", error(their_half))
        print("PATH", cvt_fast.kernel_paths(model)["cvt.encoder.stages.1.layers.0"]["linear"])
        """
    )
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["REFUSED"] == "yes"  # what the fallback protects against really happens there
    assert lines["PATH"].startswith("F.linear: bfloat16 on a CPU without native bfloat16")
    assert float(lines["ERROR"]) <= 2 * float(lines["THEIRS"]) + 1e-2  # the bfloat16 rule, transformers' as eager


def test_every_edit_reaches_the_next_call_data_included():
    """Nothing derived from the weight is kept between calls: in-place edits, load_state_dict and edits through .data
    (which no version counter sees; peft's merge makes them) all show at once."""
    layer = CvtLinear(64, 32).eval()
    x = torch.randn(5, 64)
    edits = (
        lambda: layer.weight.mul_(3.0),
        lambda: layer.weight.data.add_(torch.randn(32, 64)),
        lambda: layer.bias.data.sub_(1.0),
        lambda: layer.load_state_dict({"weight": torch.randn(32, 64), "bias": torch.randn(32)}),
    )
    with torch.no_grad():
        for edit in edits:
            before = layer(x)
            edit()
            after = layer(x)
            assert layer.route.taken == "onednn"
            assert rel_err(after, definition(x, layer.weight, layer.bias)) < 1e-5
            assert rel_err(before, after) > 1e-2


def test_autograd_training_and_compilers_keep_f_linear(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    layer = CvtLinear(16, 8)
    x = torch.randn(4, 16)
    layer.train()(x).sum().backward()  # training: gradients flow through F.linear
    assert layer.weight.grad is not None and calls == [] and layer.route.taken == "F.linear: autograd is recording"
    layer.eval()(x)  # eval, but autograd records (the weight requires grad): F.linear
    assert calls == []
    with torch.no_grad():
        layer(x)
        assert calls == [1]
        monkeypatch.setenv(cpu_linear.ONEDNN_LINEAR_VAR, "0")  # read when a layer is built (or set_backend runs)
        refusing = CvtLinear(16, 8).eval()
        refusing.load_state_dict(layer.state_dict())
        assert torch.equal(refusing(x), F.linear(x, layer.weight, layer.bias)) and calls == [1]
        assert refusing.route.taken == f"F.linear: {cpu_linear.ONEDNN_LINEAR_VAR}=0"
        monkeypatch.delenv(cpu_linear.ONEDNN_LINEAR_VAR)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert rel_err(compiled(x), definition(x, layer.weight, layer.bias)) < 1e-5 and calls == [1]
        layer.double()(x.double())
        assert calls == [1] and layer.route.taken.startswith("F.linear: dtype torch.float64")


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


def test_kernel_paths_name_the_linear_path():
    model = cvt_fast.CvtModel(cvt_fast.CvtConfig(embed_dim=[16], num_heads=[2], depth=[1])).eval()
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert {layer["linear"] for layer in cvt_fast.kernel_paths(model).values()} == {"onednn"}
