"""torch.compile(fullgraph=True) and CUDA-graph capture of the fast model, judged against transformers (the same
weights), not only against the uncompiled model.

On the CPU the graph is captured with the aot_eager backend (the whole model, no graph break, without paying for
C++ code generation). There the model takes its eager path, so the custom ops are not in that graph; they are
traced on their own in test_custom_ops.py, and inside the whole model by the GPU tests here, where inductor
compiles the model around them."""

import copy

import pytest
import torch

from support.helpers import FLOORS, harden_statistics_, model_pair, rel_err

pytestmark = pytest.mark.integration

transformers = pytest.importorskip("transformers")

CONFIG = dict(
    patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], embed_dim=[32, 64], num_heads=[1, 2],
    depth=[1, 2], cls_token=[False, True], num_labels=5,
)  # fmt: skip


def pair(backend="auto"):
    """(transformers, cvt_fast) with the same random weights and statistics that make every term matter."""
    hf, ours = harden_statistics_(model_pair(CONFIG), torch.Generator().manual_seed(0))
    ours.set_backend(backend)
    return hf, ours


@pytest.mark.parametrize("hidden", [False, True])
def test_fullgraph_eval(hidden):
    hf, m = pair()
    x = torch.randn(2, 3, 40, 32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, actual = m(x, output_hidden_states=hidden), compiled(x, output_hidden_states=hidden)
        expected = hf(x, output_hidden_states=hidden)
    assert rel_err(actual.logits, eager.logits) < 1e-6
    assert rel_err(actual.logits, expected.logits) < 2e-5
    if hidden:
        assert len(actual.hidden_states) == len(expected.hidden_states) == 2
        for a, e in zip(actual.hidden_states, expected.hidden_states, strict=True):
            assert rel_err(a, e) < 2e-5


def test_fullgraph_training_step():
    """A compiled training step is transformers' in float64 (where rounding cannot blur a difference): loss, every
    gradient, and the BatchNorm statistics it moves."""
    hf, m = (model.double().train() for model in pair())
    x, labels = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    actual, expected = compiled(x, labels=labels), hf(x, labels=labels)
    actual.loss.backward()
    expected.loss.backward()
    assert torch.isfinite(actual.loss) and rel_err(actual.loss, expected.loss) < 1e-12
    hf_params = dict(hf.named_parameters())
    largest = max(p.grad.abs().max().item() for p in hf_params.values())
    for name, param in m.named_parameters():
        assert (param.grad - hf_params[name].grad).abs().max() <= 1e-10 * largest, name
    hf_buffers = dict(hf.named_buffers())
    for name, buffer in m.named_buffers():
        assert torch.allclose(buffer, hf_buffers[name], rtol=1e-10, atol=0), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inductor_fullgraph_on_the_kernels(dtype):
    """The accuracy rule at model level: compiled, the model is as close to transformers in float64 as
    transformers in the same dtype is (2x, plus the dtype's floor)."""
    hf, m = pair("triton")
    hf, m = hf.cuda(), m.cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    reference_model, hf_in_dtype = copy.deepcopy(hf).double(), copy.deepcopy(hf).to(dtype)
    compiled = torch.compile(m.to(dtype), fullgraph=True)
    with torch.no_grad():
        reference = reference_model(x.double()).logits
        eager_err = rel_err(hf_in_dtype(x.to(dtype)).logits, reference)
        actual = compiled(x.to(dtype)).logits
    compiled_err = rel_err(actual, reference)
    assert torch.isfinite(actual).all() and compiled_err <= 2 * eager_err + FLOORS[dtype], (compiled_err, eager_err)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graph_capture(batch):
    """A replay runs the same kernels on the same inputs as an eager call: the logits must agree to float32
    rounding (cuBLAS may pick another algorithm inside a capture, so not necessarily bit for bit), and be as close
    to transformers in float64 as transformers in float32 is (the accuracy rule: 2x, plus the float32 floor)."""
    hf, m = pair("triton")
    hf, m = hf.cuda(), m.cuda()
    hf64 = copy.deepcopy(hf).double()
    static_x = torch.randn(batch, 3, 64, 64, device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compiles the kernels outside the capture
                m(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = m(static_x).logits
        fresh = torch.randn_like(static_x)
        static_x.copy_(fresh)
        graph.replay()
        assert rel_err(static_logits, m(fresh).logits) < 1e-6
        reference = hf64(fresh.double()).logits
        hf_err, replay_err = rel_err(hf(fresh).logits, reference), rel_err(static_logits, reference)
        assert replay_err <= 2 * hf_err + FLOORS[torch.float32], (replay_err, hf_err)
