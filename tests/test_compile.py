"""torch.compile(fullgraph=True) and CUDA-graph capture of the fast model.

On the CPU the graph is captured with the aot_eager backend (the whole model, no graph break, without paying for
C++ code generation); on a GPU, inductor compiles the model around the Triton custom ops."""

import pytest
import torch

import cvt_fast

from helpers import rel_err

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
    m = model("triton").to("cuda", dtype)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=dtype)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        expected, actual = m(x).logits, compiled(x).logits
    assert rel_err(actual.float(), expected.float()) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graph_capture(batch):
    m = model("triton").to("cuda", torch.float16)
    static_x = torch.randn(batch, 3, 64, 64, device="cuda", dtype=torch.float16)
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
        assert rel_err(static_logits.float(), m(fresh).logits.float()) < 1e-3
