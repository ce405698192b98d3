"""The original CvT's numerics (hidden_act "quick_gelu", stochastic_depth "original") reach every path: the Triton
kernels, torch.compile, the ONNX export, the frozen CPU package, training with gradient checkpointing. Each path's
model is held to the original-layout reference (tests/support/original_cvt.py) within its rule, and, so that a path
that ran exact GELU instead would be seen, the same model under exact GELU is further from the reference than that."""

import copy

import pytest
import torch
from test_original import pixels

import cvt_fast
from cvt_fast import CvtForImageClassification
from cvt_fast.testing import randomize_

from support.helpers import rel_err
from support.original_cvt import SMALL_SPEC, OriginalCvT

pytestmark = pytest.mark.integration

FLOAT32_RULE = 2e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = randomize_(OriginalCvT(SMALL_SPEC, num_classes=10), torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("original") / "final_state.pth"
    torch.save(model.state_dict(), path)
    return model.double().eval(), path


def judged(logits: torch.Tensor, reference: torch.Tensor, path: str, gelu_err: float) -> None:
    err = rel_err(logits, reference)
    assert err < FLOAT32_RULE, f"{path}: {err:.1e} from the reference"
    assert gelu_err > 100 * FLOAT32_RULE, "exact GELU must be told apart from QuickGELU on these inputs"


@pytest.fixture(scope="module")
def expected(checkpoint):
    reference, path = checkpoint
    x = pixels(batch=2, dtype=torch.float32)
    with torch.inference_mode():
        gelu = CvtForImageClassification.from_original(path, spec=SMALL_SPEC, hidden_act="gelu")(x).logits
        truth = reference(x.double())
    return x, truth, rel_err(gelu, truth)


def test_the_kernels(checkpoint, expected):
    pytest.importorskip("triton")
    from cvt_fast.ops import dispatch

    if not dispatch.TRITON_INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs a GPU or Triton's interpreter")
    _, path = checkpoint
    x, truth, gelu_err = expected
    model = CvtForImageClassification.from_original(path, spec=SMALL_SPEC, backend="triton")
    with torch.inference_mode():
        logits = model(x).logits
    assert {layer["qkv_projection"] for layer in model.kernel_paths().values()} == {"triton"}
    judged(logits, truth, "backend triton", gelu_err)


@pytest.mark.slow
def test_torch_compile(checkpoint, expected):
    _, path = checkpoint
    x, truth, gelu_err = expected
    model = CvtForImageClassification.from_original(path, spec=SMALL_SPEC, backend="eager")
    # Static shapes, and a fresh start: after the suite's other compiles in this process, dynamo would make these
    # shapes dynamic, and inductor (torch 2.13, CPU) then fails to lower a depthwise convolution with symbolic sizes
    # ("ValueRangeError: Invalid ranges [0:-1]"), whatever the activation.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        judged(compiled(x).logits, truth, "torch.compile", gelu_err)


@pytest.mark.slow
def test_the_onnx_export(checkpoint, expected, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, path = checkpoint
    x, truth, gelu_err = expected
    model = CvtForImageClassification.from_original(path, spec=SMALL_SPEC)
    from cvt_fast.export import export_onnx

    export_onnx(model, tmp_path / "original.onnx", validation_sizes=((1, 48, 48), (2, 32, 64)))
    session = onnxruntime.InferenceSession(str(tmp_path / "original.onnx"), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])
    judged(logits, truth, "ONNX Runtime", gelu_err)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["inductor", "onnxruntime", "openvino"])
def test_the_frozen_cpu_package(checkpoint, expected, tmp_path, engine):
    from cvt_fast.cpu_target import this_cpu
    from cvt_fast.frozen.engines import engine as engine_module

    reason = engine_module(engine).missing() or engine_module(engine).refuses(torch.float32, this_cpu())
    if reason:
        pytest.skip(reason)
    _, path = checkpoint
    x, truth, gelu_err = expected
    model = CvtForImageClassification.from_original(path, spec=SMALL_SPEC)
    frozen = cvt_fast.freeze(model, batch_size=2, image_size=48, dtype=torch.float32, engine=engine)
    frozen.save(tmp_path / "original.cvt")
    loaded = cvt_fast.load_frozen(tmp_path / "original.cvt")
    assert loaded.config.hidden_act == "quick_gelu" and loaded.engine == engine
    judged(loaded(x).logits, truth, f"frozen package ({engine})", gelu_err)


def test_training_with_gradient_checkpointing_is_the_original_step(checkpoint):
    """The same seeded training step with and without checkpointing (activations recomputed, drop-path masks drawn
    again from the restored random state), both equal to the reference's."""
    reference, path = checkpoint
    reference = copy.deepcopy(reference).train()
    plain = CvtForImageClassification.from_original(path, spec=SMALL_SPEC).double().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    x, labels = pixels(batch=8), torch.arange(8) % 10
    results = []
    for model in (reference, plain, checkpointed):
        torch.manual_seed(3)
        logits = model(x) if model is reference else model(x).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        results.append(logits.detach())
    assert rel_err(results[1], results[0]) < 1e-12 and rel_err(results[2], results[0]) < 1e-12
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_a_transformers_model_given_such_a_config_is_mirrored_as_it_runs(checkpoint, tmp_path):
    """transformers ignores hidden_act and stochastic_depth: from_transformers (and patch) mirror what it runs."""
    transformers = pytest.importorskip("transformers")
    _, path = checkpoint
    CvtForImageClassification.from_original(path, spec=SMALL_SPEC).save_pretrained(tmp_path / "converted")
    theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path / "converted").eval()
    assert theirs.config.hidden_act == "quick_gelu"  # kept in its config, unused by its model
    ours = cvt_fast.from_transformers(theirs)
    assert ours.config.hidden_act == "gelu" and ours.config.stochastic_depth == "transformers"
    x = pixels(batch=2, dtype=torch.float32)
    with torch.inference_mode():
        assert rel_err(ours(x).logits, theirs(x).logits) < FLOAT32_RULE
