"""The fused ops as torch custom ops: registration checked by torch.library.opcheck (schema, fake/meta kernel,
autograd registration), a graph through torch.compile(fullgraph=True) without a break, and values against float64
oracles written from the definition (conv then BatchNorm; softmax of scaled scores), not only against the
reference the op dispatches to."""

import pytest
import torch

from cvt_fast import ops

from support.helpers import FLOORS, attention_definition, qkv_projection_definition, rel_err

pytestmark = pytest.mark.unit

EPS = [1e-5, 1e-3, 1e-4]  # q, k, v: distinct, and comparable to the smallest running variances below
STRIDES = [(1, 1), (2, 1), (2, 1)]  # (stride, padding) of q, k, v


def conv_bn_args(device, dtype=torch.float32, with_cls=True):
    generator = torch.Generator().manual_seed(0)
    channels, ksize = 12, 3
    weights = [torch.randn(channels, 1, ksize, ksize, generator=generator) for _ in range(3)]
    bn = []
    for _ in range(3):
        var = torch.rand(channels, generator=generator) + 0.5
        var[::3] = 1e-4 + 9e-4 * torch.rand(4, generator=generator)  # where eps is a visible part of var + eps
        bn += [torch.randn(channels, generator=generator), torch.randn(channels, generator=generator)]
        bn += [torch.randn(channels, generator=generator), var]
    x = torch.randn(2, int(with_cls) + 5 * 6, channels, generator=generator)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (to(x), 5, 6, with_cls, [to(w) for w in weights], [to(p) for p in bn], EPS, *STRIDES[0], *STRIDES[1])


def conv_bn_definition(args):
    x, height, width, with_cls, weights, bn_params, eps = args[:7]
    return qkv_projection_definition(x, height, width, with_cls, weights, bn_params, eps, STRIDES)


def attention_args(device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 64, generator=generator) for n in (9, 4, 4))
    k[:, 1] *= 6  # one key far above the rest: scores up to ~25
    return (*(t.to(device=device, dtype=dtype) for t in (q, k, v)), 2, 64**-0.5)


@pytest.mark.parametrize("with_cls", [True, False])
def test_opcheck_qkv_projection_cpu(with_cls):
    torch.library.opcheck(torch.ops.cvt_fast.qkv_projection.default, conv_bn_args("cpu", with_cls=with_cls))


def test_opcheck_attention_cpu():
    torch.library.opcheck(torch.ops.cvt_fast.attention.default, attention_args("cpu"))


@pytest.mark.parametrize("with_cls", [True, False])
def test_cpu_custom_ops_are_the_reference_and_the_definition(with_cls):
    args = conv_bn_args("cpu", with_cls=with_cls)
    q, k, v = torch.ops.cvt_fast.qkv_projection(*args)
    reference = ops.qkv_projection_reference(*args)
    for name, a, r, d in zip("qkv", (q, k, v), reference, conv_bn_definition(args), strict=True):
        assert torch.equal(a, r), f"{name}: the CPU op is not the eager reference"
        assert rel_err(a, d) < FLOORS[torch.float32], f"{name}: {rel_err(a, d):.2e} from the definition"
    attn = attention_args("cpu")
    out = torch.ops.cvt_fast.attention(*attn)
    assert torch.equal(out, ops.attention_reference(*attn))
    assert rel_err(out, attention_definition(*attn)) < FLOORS[torch.float32]


def test_custom_ops_trace_into_one_graph():
    def layer(x, conv_args, attn_args):
        q, k, v = torch.ops.cvt_fast.qkv_projection(x, *conv_args)
        return torch.ops.cvt_fast.attention(q, k, v, *attn_args)

    args = conv_bn_args("cpu")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    actual = compiled(args[0], args[1:], (3, 12**-0.5))
    assert torch.equal(actual, layer(args[0], args[1:], (3, 12**-0.5)))
    assert rel_err(actual, attention_definition(*conv_bn_definition(args), 3, 12**-0.5)) < FLOORS[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_on_cuda(dtype):
    torch.library.opcheck(torch.ops.cvt_fast.qkv_projection.default, conv_bn_args("cuda", dtype))
    torch.library.opcheck(torch.ops.cvt_fast.attention.default, attention_args("cuda", dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_custom_ops_run_the_kernels_within_the_rule(dtype):
    """The kernels behind the ops, against the float64 definition: error at most 2x eager PyTorch's in the same
    dtype (the eager reference, on the same inputs) plus the dtype's floor."""
    args = conv_bn_args("cuda", dtype)
    definition = conv_bn_definition(args)
    eager = ops.qkv_projection_reference(*args)
    for name, a, e, d in zip("qkv", torch.ops.cvt_fast.qkv_projection(*args), eager, definition, strict=True):
        assert torch.isfinite(a).all() and rel_err(a, d.cuda()) <= 2 * rel_err(e, d.cuda()) + FLOORS[dtype], name
    attn = attention_args("cuda", dtype)
    definition = attention_definition(*attn)
    out, eager = torch.ops.cvt_fast.attention(*attn), ops.attention_reference(*attn)
    assert torch.isfinite(out).all() and rel_err(out, definition) <= 2 * rel_err(eager, definition) + FLOORS[dtype]
