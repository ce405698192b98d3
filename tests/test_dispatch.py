"""The backend decision: one place, a reason for every fallback, a clear error where 'triton' cannot run."""

import logging

import pytest
import torch

from cvt_fast import CvtConfig, CvtForImageClassification, KernelUnavailableError
from cvt_fast.ops import dispatch
from cvt_fast.ops.dispatch import ENV_VAR, resolve_backend

from support.helpers import fused_ops, model_pair, rel_err

pytestmark = pytest.mark.unit

CONFIG = dict(depth=[1, 1], embed_dim=[64, 64], num_heads=[1, 2], cls_token=[False, True], num_labels=3)


def test_backend_from_argument_then_environment_then_auto(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None) == "auto"
    monkeypatch.setenv(ENV_VAR, "Eager")
    assert resolve_backend(None) == "eager"
    assert resolve_backend("triton") == "triton"
    assert CvtForImageClassification(CvtConfig(**CONFIG)).backend == "eager"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR} is 'cuda'"):
        resolve_backend(None)


def test_set_backend_reaches_every_layer():
    model = CvtForImageClassification(CvtConfig(**CONFIG), backend="eager").eval()
    model.set_backend("auto")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    paths = model.kernel_paths()
    assert set(paths) == {"cvt.encoder.stages.0.layers.0", "cvt.encoder.stages.1.layers.0"}
    assert all(p["attention"].startswith("eager: CPU tensors") for p in paths.values())


def test_eager_backend_reports_itself():
    model = CvtForImageClassification(CvtConfig(**CONFIG), backend="eager").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert {p["qkv_projection"] for p in model.kernel_paths().values()} == {"eager: backend='eager'"}


def test_auto_logs_each_reason_once(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged_reasons", set())  # forget what earlier tests logged
    model = CvtForImageClassification(CvtConfig(**CONFIG), backend="auto").train()
    with caplog.at_level(logging.INFO, logger="cvt_fast"):
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32))
    training_lines = [r for r in caplog.records if "training mode" in r.getMessage()]
    assert len(training_lines) == 2  # one per op (qkv_projection, attention), not one per call or per layer


def test_triton_backend_refuses_what_the_kernels_cannot_run():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = CvtForImageClassification(CvtConfig(**CONFIG), backend="triton").to(device, torch.float64).eval()
    if device == "cpu" and not dispatch.TRITON_INTERPRET:
        expected = "CPU tensors: the kernels run on CUDA"
    elif dispatch.kernels_import_error():
        expected = "the Triton kernels are unavailable"
    else:
        expected = "dtype torch.float64: the kernels take float32, float16 and bfloat16"
    with pytest.raises(KernelUnavailableError, match=f"backend='triton' cannot run qkv_projection: {expected}"):
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32, dtype=torch.float64, device=device))


def test_training_and_autograd_take_the_eager_path_even_under_triton():
    """... and compute what transformers computes there (float64: the same math, to rounding)."""
    pytest.importorskip("transformers")
    kwargs = dict(CONFIG, depth=[1, 2])  # transformers needs depth[s] > s
    hf, model = (m.double().train() for m in model_pair(kwargs))
    model.set_backend("triton")
    x, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1])
    actual, expected = model(x, labels=labels), hf(x, labels=labels)
    actual.loss.backward()
    expected.loss.backward()
    assert all(
        p.startswith("eager: training") for layer in model.kernel_paths().values() for p in fused_ops(layer).values()
    )
    assert rel_err(actual.logits, expected.logits) < 1e-12
    hf_params = dict(hf.named_parameters())
    largest = max(p.grad.abs().max().item() for p in hf_params.values())
    for name, param in model.named_parameters():
        assert (param.grad - hf_params[name].grad).abs().max() <= 1e-10 * largest, name


def test_kernel_paths_print_each_reason_once():
    """Printed, kernel_paths() groups the layers that took the same paths and writes each reason once."""
    model = CvtForImageClassification(CvtConfig(**CONFIG), backend="eager").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    paths = model.kernel_paths()
    layers = sorted(paths)
    assert str(paths).splitlines() == [
        f"{len(layers)} layers ({layers[0]} ... {layers[-1]}): qkv_projection eager [1], attention eager [1], "
        "linear onednn",
        "[1] backend='eager'",
    ]
    assert paths[layers[0]]["attention"] == "eager: backend='eager'"  # still a dict of the full paths
    mixed = type(paths)(a={"attention": "triton", "linear": "F.linear: x"}, b={"attention": "eager: y"})
    assert str(mixed).splitlines() == ["a: attention triton, linear F.linear [1]", "b: attention eager [2]", "[1] x",
                                       "[2] y"]  # fmt: skip


def test_decisions_are_taken_once_not_on_every_forward(monkeypatch):
    """The environment is read when the model is built or its backend set, not per call; what the tensors bring
    (device, dtype) is decided on their first call and kept, while training and autograd are looked at each time."""
    from cvt_fast.ops import cpu_linear
    from cvt_fast.ops.dispatch import FP32_ATTENTION_VAR, KernelRoute

    monkeypatch.delenv(FP32_ATTENTION_VAR, raising=False)
    monkeypatch.delenv(cpu_linear.ONEDNN_LINEAR_VAR, raising=False)
    model = CvtForImageClassification(CvtConfig(**CONFIG), backend="auto").eval()
    decided = []
    real_decide = KernelRoute._decide
    monkeypatch.setattr(KernelRoute, "_decide", lambda self, *key: decided.append(key) or real_decide(self, *key))
    x = torch.randn(1, 3, 32, 32)
    monkeypatch.setenv(FP32_ATTENTION_VAR, "not-a-mode")  # set after the model was built: not read by a forward
    monkeypatch.setenv(cpu_linear.ONEDNN_LINEAR_VAR, "0")
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        assert len(decided) == 2 * 2  # two layers, two fused ops each, once for (cpu, float32)
        model.double()(x.double())
        assert len(decided) == 2 * 2 * 2  # float64: a new verdict, once
        model.float()(x)
        linear_paths = {layer["linear"] for layer in model.kernel_paths().values()}
    assert not any(cpu_linear.ONEDNN_LINEAR_VAR in path for path in linear_paths), linear_paths
    model.train()(x)  # training is looked at on every call
    assert {p for layer in model.kernel_paths().values() for p in fused_ops(layer).values()} == {
        f"eager: {dispatch.TRAINING}"
    }
    assert len(decided) == 2 * 2 * 2
    with pytest.raises(ValueError, match=f"{FP32_ATTENTION_VAR} is 'not-a-mode'"):
        model.set_backend("auto")  # ... where the environment is read again
    monkeypatch.setenv(FP32_ATTENTION_VAR, "tf32x3")
    model.set_backend("auto")
    with torch.inference_mode():
        model.eval()(x)
    assert {layer["linear"] for layer in model.kernel_paths().values()} == {
        f"F.linear: {cpu_linear.ONEDNN_LINEAR_VAR}=0"
    }


def test_a_model_pickles_whole_and_decides_again_where_it_is_loaded(tmp_path):
    """torch.save(model) (and a spawned worker) pickles each layer's routes: they must hold no lambda, and they keep
    no verdict, which judged the environment (GPU, Triton, the CPU's bfloat16) of the process that made it."""
    import io

    config = CvtConfig(**dict(CONFIG, qkv_projection_method=["dw_bn", "avg"]))
    model = CvtForImageClassification(config, backend="auto").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        before = model(x).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    routes = [r for m in loaded.modules() if hasattr(m, "qkv_route") for r in (m.qkv_route, m.attention_route)]
    assert len(routes) == 4 and all(r._verdicts == {} and r.taken is None for r in routes)
    linear_routes = [m.route for m in loaded.modules() if hasattr(m, "route")]
    assert linear_routes and all(r._by_dtype == {} and r.taken is None for r in linear_routes)
    with torch.inference_mode():
        assert torch.equal(loaded(x).logits, before)
    assert loaded.kernel_paths() == model.kernel_paths()  # the "avg" layer still says why it is not fused


def test_a_bad_environment_leaves_the_model_as_it_was(monkeypatch):
    """set_backend and patch refuse a bad CVT_FAST_FP32_ATTENTION before any layer changes."""
    from cvt_fast import patch
    from cvt_fast.ops.dispatch import FP32_ATTENTION_VAR

    model = CvtForImageClassification(CvtConfig(**CONFIG), backend="eager").eval()
    monkeypatch.setenv(FP32_ATTENTION_VAR, "not-a-mode")
    with pytest.raises(ValueError, match=f"{FP32_ATTENTION_VAR} is 'not-a-mode'"):
        model.set_backend("auto")
    layers = [m for m in model.modules() if hasattr(m, "qkv_route")]
    assert model.backend == "eager"
    assert {(m.backend, m.qkv_route.backend, m.attention_route.backend) for m in layers} == {("eager",) * 3}
    transformers = pytest.importorskip("transformers")
    hf = transformers.CvtForImageClassification(transformers.CvtConfig(**dict(CONFIG, depth=[1, 2])))
    with pytest.raises(ValueError, match=f"{FP32_ATTENTION_VAR} is 'not-a-mode'"):
        patch(hf, backend="auto")
    assert not any(type(m).__module__.startswith("cvt_fast") for m in hf.modules())
