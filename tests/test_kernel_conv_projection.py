"""The fused depthwise conv + BatchNorm kernel (q/k/v projection) against a float64 reference written from the
definition (F.conv2d, then F.batch_norm on running statistics, then tokens and the cls row), not from the folding
code the kernel uses.

Statistics that make every term matter: running variances down to 1e-4 (so that a dropped eps moves outputs by
percents), a different eps for q, k and v (so that swapping them shows), means and shifts far from zero, large
activations in half precision. Without a GPU these run in Triton's interpreter on CPU tensors (small shapes; no
bfloat16 there)."""

import random

import pytest
import torch
import torch.nn.functional as F

from cvt_fast import ops

from support.helpers import DEVICE, assert_within_rule, nan_like, rel_err

pytest.importorskip("triton")
from cvt_fast.kernels import qkv_conv_bn  # noqa: E402
from cvt_fast.kernels.conv_projection import ConvConfig  # noqa: E402

pytestmark = pytest.mark.kernel

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
EPS = (1e-5, 1e-3, 1e-4)  # q, k, v: distinct, and each comparable to the smallest variances


def random_params(channels, ksize, stride_q, padding_q, stride_kv, padding_kv, generator, device=DEVICE):
    def one(stride, padding, eps):
        # Half the channels get variances of 1e-4..1e-3, where eps (1e-5..1e-3) is a visible part of var + eps.
        var = 0.5 + torch.rand(channels, generator=generator, dtype=torch.float64) * 1.5
        small = torch.rand(channels, generator=generator) < 0.5
        var[small] = 1e-4 + torch.rand(int(small.sum()), generator=generator, dtype=torch.float64) * 9e-4
        return ops.ConvBN(
            torch.randn(channels, 1, ksize, ksize, generator=generator, dtype=torch.float64) / ksize,
            1 + 0.3 * torch.randn(channels, generator=generator, dtype=torch.float64),
            torch.randn(channels, generator=generator, dtype=torch.float64),
            0.5 * torch.randn(channels, generator=generator, dtype=torch.float64),
            var,
            eps,
            stride,
            padding,
        )

    params = [one(stride_q, padding_q, EPS[0]), one(stride_kv, padding_kv, EPS[1]), one(stride_kv, padding_kv, EPS[2])]
    return [p._replace(**{f: getattr(p, f).to(device) for f in ops.ConvBN._fields[:5]}) for p in params]


def cast(params, dtype, device=None):
    fields = ops.ConvBN._fields[:5]
    return [p._replace(**{f: getattr(p, f).to(device=device, dtype=dtype) for f in fields}) for p in params]


def definition(x, height, width, with_cls, params):
    """What transformers does, in x's dtype: conv, then BatchNorm, then tokens, then the cls row in front."""
    cls, tokens = (x[:, :1], x[:, 1:]) if with_cls else (None, x)
    grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
    outs = []
    for p in params:
        y = F.conv2d(grid, p.weight, None, p.stride, p.padding, groups=x.shape[2])
        y = F.batch_norm(y, p.running_mean, p.running_var, p.bn_weight, p.bn_bias, False, 0.0, p.eps)
        y = y.flatten(2).transpose(1, 2)
        outs.append(torch.cat((cls, y), 1) if cls is not None else y)
    return outs


def run_kernel(x, height, width, with_cls, params, poison=True, config=None):
    out = None
    if poison:  # NaN-filled outputs: an element the kernel does not write fails the test
        ksize = params[0].weight.shape[-1]
        sides = [[ops.conv_output_size(s, ksize, p.stride, p.padding) for s in (height, width)] for p in params]
        tokens = [int(with_cls) + h * w for h, w in sides]
        out = tuple(nan_like((x.shape[0], n, x.shape[2]), x.dtype, x.device) for n in tokens)
    return qkv_conv_bn(x, height, width, with_cls, *ops.qkv_operands(*params), out=out, config=config)


def check_case(
    batch, height, width, channels, ksize, stride_kv, padding_kv, with_cls, dtype, seed, config=None, scale=1
):
    generator = torch.Generator().manual_seed(seed)
    params64 = random_params(channels, ksize, 1, ksize // 2, stride_kv, padding_kv, generator, device=DEVICE)
    x64 = scale * torch.randn(batch, int(with_cls) + height * width, channels, generator=generator, dtype=torch.float64)
    x64 = x64.to(DEVICE)
    references = definition(x64, height, width, with_cls, params64)  # float64, on the device (GPU shapes are big)
    x, params = x64.to(dtype), cast(params64, dtype)
    eager = definition(x, height, width, with_cls, params)
    actual = run_kernel(x, height, width, with_cls, params, config=config)
    for name, a, e, r in zip("qkv", actual, eager, references, strict=True):
        assert a.shape == r.shape and a.dtype == dtype
        assert_within_rule(a, e, r, dtype, f"{name} {dtype}")
    if with_cls:  # the cls row is copied, bit for bit
        for a in actual:
            assert torch.equal(a[:, 0], x[:, 0])


CASES = [
    # batch, height, width, channels, kernel, stride_kv, padding_kv, cls
    (1, 1, 1, 16, 3, 2, 1, False),  # a single pixel
    (1, 2, 3, 24, 3, 2, 1, True),  # smaller than a block, cls
    (2, 7, 5, 40, 3, 2, 1, False),  # odd, non-square, channels not a power of two
    (3, 9, 4, 8, 3, 2, 0, True),  # no padding for k/v
    (1, 6, 6, 20, 5, 2, 2, True),  # kernel 5
    (2, 5, 7, 12, 1, 1, 0, False),  # kernel 1, stride 1
    (1, 11, 3, 36, 3, 3, 1, False),  # stride 3
    (1, 4, 9, 40, 7, 2, 3, True),  # kernel 7, channels over several 16-blocks
]
# Default blocks; 16 x 16 blocks (several blocks of positions and channels); and programs that walk through three
# position blocks each, so that the last program runs past the end of both grids.
CONFIGS = [None, ConvConfig(16, 16, 1, 1), ConvConfig(16, 16, 1, 3)]


@pytest.mark.parametrize("config", CONFIGS, ids=["default-blocks", "16x16", "16x16-loop3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_against_float64_definition(case, dtype, config):
    check_case(*case, dtype=dtype, seed=hash(case) % 1000, config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_activations(dtype):
    """Inputs around 30 times the unit scale, through BatchNorm scales up to 100: outputs in the thousands, which
    half precision must carry without overflow or loss beyond what eager PyTorch loses."""
    check_case(2, 6, 5, 24, 3, 2, 1, True, dtype, seed=11, config=ConvConfig(16, 16, 1, 2), scale=30.0)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed):
    rng = random.Random(seed)
    ksize = rng.choice([1, 3, 3, 5])
    padding_kv = rng.randint(0, ksize // 2)
    smallest = max(1, ksize - 2 * padding_kv)  # every conv needs at least one output pixel
    check_case(
        batch=rng.randint(1, 3),
        height=rng.randint(smallest, 10),
        width=rng.randint(smallest, 10),
        channels=rng.choice([4, 8, 12, 20, 33]),
        ksize=ksize,
        stride_kv=rng.choice([1, 2, 2, 3]),
        padding_kv=padding_kv,
        with_cls=rng.random() < 0.5,
        dtype=torch.float32,
        seed=seed,
        config=ConvConfig(16, 16, 1, rng.choice([1, 2])),
    )


def test_edits_to_weights_and_statistics_are_honoured():
    """The kernel folds BatchNorm on every call: an edit of any of the 15 tensors (conv weight, gamma, beta, running
    mean and variance of q, k and v) must reach the next call, in place or through .data (which no version counter
    sees, as a BatchNorm's own update of its running statistics in training mode is not seen)."""
    generator = torch.Generator().manual_seed(1)
    params = cast(random_params(16, 3, 1, 1, 2, 1, generator), torch.float32)
    x = torch.randn(1, 25, 16, generator=generator).to(DEVICE)
    with torch.no_grad():
        for projection in params:
            for i, field in enumerate(ops.ConvBN._fields[:5]):
                before = run_kernel(x, 5, 5, False, params)
                tensor = getattr(projection, field)
                (tensor if i % 2 else tensor.data).mul_(1.5)  # as a user, or peft's merge, would
                after = run_kernel(x, 5, 5, False, params)
                expected = definition(x.cpu().double(), 5, 5, False, cast(params, torch.float64, "cpu"))
                errors = [rel_err(a.cpu(), e) for a, e in zip(after, expected, strict=True)]
                stale = [rel_err(b.cpu(), e) for b, e in zip(before, expected, strict=True)]
                assert max(errors) < 1e-5 and max(stale) > 1e-3, f"edit of {field}: {errors}, {stale}"


def test_inputs_with_a_row_stride_and_bad_shapes():
    generator = torch.Generator().manual_seed(2)
    params = cast(random_params(8, 3, 1, 1, 2, 1, generator), torch.float32)
    wide = torch.randn(2, 1 + 16, 24, generator=generator).to(DEVICE)
    x = wide[:, :, 8:16]  # channel stride 1, token stride 24: read in place
    expected = definition(x.cpu().double(), 4, 4, True, cast(params, torch.float64, "cpu"))
    for a, e in zip(run_kernel(x, 4, 4, True, params), expected, strict=True):
        assert rel_err(a.cpu(), e) < 1e-5
    with pytest.raises(ValueError, match="x has 17 tokens; expected 1 \\+ 4x5"):
        qkv_conv_bn(x, 4, 5, True, *ops.qkv_operands(*params))


# CvT-13/21 and CvT-W24 stages at 224 and 384: (grid side, channels, cls token).
STAGES = [
    (56, 64, False), (28, 192, False), (14, 384, True),  # CvT-13/21 at 224
    (96, 64, False), (48, 192, False), (24, 384, True),  # at 384
    (56, 192, False), (28, 768, False), (14, 1024, True),  # CvT-W24 at 224
    (96, 192, False), (48, 768, False), (24, 1024, True),  # at 384
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("height, channels, with_cls", STAGES)
def test_cvt_stage_shapes_on_gpu(height, channels, with_cls, dtype, batch):
    """The table's own configurations (a position loop at batch 32, none at batch 1) on every CvT stage."""
    check_case(batch, height, height, channels, 3, 2, 1, with_cls, dtype, seed=height + channels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reruns_are_bitwise_equal_on_gpu(dtype):
    """100 launches on the same inputs give the same bits: a moving answer is a race between programs."""
    generator = torch.Generator().manual_seed(0)
    params = cast(random_params(192, 3, 1, 1, 2, 1, generator), dtype)
    x = torch.randn(32, 28 * 28, 192, generator=generator).to(DEVICE, dtype)
    first = run_kernel(x, 28, 28, False, params)
    for _ in range(100):
        for a, b in zip(first, run_kernel(x, 28, 28, False, params), strict=True):
            assert torch.equal(a, b)
