"""torch.compile(fullgraph=True) and CUDA-graph capture of the fast model.

On the CPU the graph is captured with the aot_eager backend (the whole model, no graph break, without paying for
C++ code generation). There the model takes its eager path, so the custom ops are not in that graph; they are
traced on their own in test_custom_ops.py, and inside the whole model by the GPU tests here, where inductor
compiles the model around them."""

import copy

import pytest
import torch

import cvt_fast

from helpers import FLOORS, rel_err

CONFIG = dict(
    patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], embed_dim=[32, 64], num_heads=[1, 2],
    depth=[1, 2], cls_token=[False, True], num_labels=5,
)  # fmt: skip


def model(backend="auto"):
    from cvt_fast.testing import randomize_

    return randomize_(cvt_fast.CvtForImageClassification(cvt_fast.CvtConfig(**CONFIG), backend=backend)).eval()


@pytest.mark.parametrize("hidden", [False, True])
def test_fullgraph_eval(hidden):
    m = model()
    x = torch.randn(2, 3, 40, 32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected, actual = m(x, output_hidden_states=hidden), compiled(x, output_hidden_states=hidden)
    assert rel_err(actual.logits, expected.logits) < 1e-6
    if hidden:
        assert len(actual.hidden_states) == 2


def test_fullgraph_training_step():
    m = model().train()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss = compiled(x, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and m.classifier.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inductor_fullgraph_on_the_kernels(dtype):
    """The accuracy rule at model level: compiled, the model is as close to float64 as eager PyTorch in the same
    dtype is (2x, plus the dtype's floor)."""
    m = model("triton").cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    reference_model, eager = copy.deepcopy(m).double(), copy.deepcopy(m).to(dtype)
    reference_model.set_backend("eager")
    eager.set_backend("eager")
    compiled = torch.compile(m.to(dtype), fullgraph=True)
    with torch.no_grad():
        reference = reference_model(x.double()).logits
        eager_err = rel_err(eager(x.to(dtype)).logits, reference)
        compiled_err = rel_err(compiled(x.to(dtype)).logits, reference)
    assert compiled_err <= 2 * eager_err + FLOORS[dtype], (compiled_err, eager_err)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graph_capture(batch):
    """A replay runs the same kernels on the same inputs as an eager call: the logits must agree to float32
    rounding (cuBLAS may pick another algorithm inside a capture, so not necessarily bit for bit)."""
    m = model("triton").cuda()
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
