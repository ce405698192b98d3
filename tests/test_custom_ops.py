"""The fused ops as torch custom ops: registration checked by torch.library.opcheck (schema, fake/meta kernel,
autograd registration), and a graph through torch.compile(fullgraph=True) without a break."""

import pytest
import torch

from cvt_fast import ops

from helpers import rel_err


def conv_bn_args(device, dtype=torch.float32, with_cls=True):
    generator = torch.Generator().manual_seed(0)
    channels, ksize = 12, 3
    weights = [torch.randn(channels, 1, ksize, ksize, generator=generator) for _ in range(3)]
    bn = []
    for _ in range(3):
        bn += [torch.randn(channels, generator=generator), torch.randn(channels, generator=generator)]
        bn += [torch.randn(channels, generator=generator), torch.rand(channels, generator=generator) + 0.5]
    x = torch.randn(2, int(with_cls) + 5 * 6, channels, generator=generator)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (to(x), 5, 6, with_cls, [to(w) for w in weights], [to(p) for p in bn], [1e-5] * 3, 1, 1, 2, 1)


def attention_args(device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 64, generator=generator).to(device=device, dtype=dtype) for n in (9, 4, 4))
    return (q, k, v, 2, 64**-0.5)


@pytest.mark.parametrize("with_cls", [True, False])
def test_opcheck_qkv_projection_cpu(with_cls):
    torch.library.opcheck(torch.ops.cvt_fast.qkv_projection.default, conv_bn_args("cpu", with_cls=with_cls))


def test_opcheck_attention_cpu():
    torch.library.opcheck(torch.ops.cvt_fast.attention.default, attention_args("cpu"))


def test_cpu_custom_ops_are_the_reference():
    args = conv_bn_args("cpu")
    q, k, v = torch.ops.cvt_fast.qkv_projection(*args)
    params = ops.unflatten_conv_bn(*args[4:])
    for a, e in zip((q, k, v), ops.qkv_projection_reference(args[0], 5, 6, True, *params), strict=True):
        assert torch.equal(a, e)
    attn = attention_args("cpu")
    assert torch.equal(torch.ops.cvt_fast.attention(*attn), ops.attention_reference(*attn))


def test_custom_ops_trace_into_one_graph():
    def layer(x, conv_args, attn_args):
        q, k, v = torch.ops.cvt_fast.qkv_projection(x, *conv_args)
        return torch.ops.cvt_fast.attention(q, k, v, *attn_args)

    args = conv_bn_args("cpu")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    expected = layer(args[0], args[1:], (3, 12**-0.5))
    assert torch.equal(compiled(args[0], args[1:], (3, 12**-0.5)), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_on_cuda(dtype):
    torch.library.opcheck(torch.ops.cvt_fast.qkv_projection.default, conv_bn_args("cuda", dtype))
    torch.library.opcheck(torch.ops.cvt_fast.attention.default, attention_args("cuda", dtype))


@pytest.mark.gpu
def test_cuda_custom_ops_run_the_kernels():
    args = conv_bn_args("cuda")
    params = ops.unflatten_conv_bn(*args[4:])
    for a, e in zip(
        torch.ops.cvt_fast.qkv_projection(*args),
        ops.qkv_projection_reference(args[0], 5, 6, True, *params),
        strict=True,
    ):
        assert rel_err(a, e) < 1e-5
    attn = attention_args("cuda")
    assert rel_err(torch.ops.cvt_fast.attention(*attn), ops.attention_reference(*attn)) < 1e-5
