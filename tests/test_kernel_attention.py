"""The flash-attention kernel against a float64 reference written from the definition, softmax(q k^T * scale) v
per head: unequal lengths, masked tails, CvT's scale.

Magnitudes that make every term matter: besides unit-scale inputs, scores of up to about +-100 with a few keys far
above the rest (an online softmax that forgets its running maximum overflows there, in float16 from a score of
about 11 on, in float32 from about 88 on), with the largest key in the first, a middle or the last, masked block.
Without a GPU these run in Triton's interpreter on CPU tensors (small shapes; no bfloat16 there)."""

import random

import pytest
import torch

from support.helpers import DEVICE, assert_within_rule, nan_like, rel_err

pytest.importorskip("triton")
from cvt_fast.kernels import flash_attention  # noqa: E402
from cvt_fast.kernels.attention import AttentionConfig  # noqa: E402

pytestmark = pytest.mark.kernel

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def definition(q, k, v, heads, scale):
    """softmax(q k^T * scale) v for each head h, which owns channels h*D .. h*D+D-1; (B, N, C) in and out.
    One image at a time: the score matrices of a CvT stage at 384 px are 0.5 GB per image in float64."""
    n_q, channels = q.shape[1:]
    split = lambda t: t.reshape(t.shape[0], heads, channels // heads).transpose(0, 1)  # noqa: E731  (heads, N, D)
    outputs = []
    for qi, ki, vi in zip(q, k, v, strict=True):
        probs = torch.softmax(split(qi) @ split(ki).transpose(-1, -2) * scale, dim=-1)
        outputs.append((probs @ split(vi)).transpose(0, 1).reshape(n_q, channels))
    return torch.stack(outputs)


def inputs(batch, n_q, n_k, channels, generator, magnitude):
    q, k, v = (torch.randn(batch, n, channels, generator=generator, dtype=torch.float64) for n in (n_q, n_k, n_k))
    if magnitude == "large":
        # Scaled scores of std ~30 (so up to ~100), and one key per image four times stronger than the rest,
        # placed in the first, a middle or the last block of keys.
        q = q * 30
        strong = torch.randint(0, n_k, (batch,), generator=generator)
        k[torch.arange(batch), strong] *= 4
    return q, k, v


def check_case(batch, n_q, n_k, heads, head_dim, dtype, seed, layout="contiguous", config=None, magnitude="unit"):
    generator = torch.Generator().manual_seed(seed)
    channels = heads * head_dim
    q64, k64, v64 = (t.to(DEVICE) for t in inputs(batch, n_q, n_k, channels, generator, magnitude))
    scale = channels**-0.5  # CvT's embed_dim ** -0.5
    reference = definition(q64, k64, v64, heads, scale)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    if layout == "strided":  # heads read by stride from wider rows, as slices of a fused projection would be
        q, k, v = (torch.cat((t, torch.zeros_like(t)), dim=2)[:, :, :channels] for t in (q, k, v))
        assert q.stride(1) == 2 * channels
    eager = torch.nn.functional.scaled_dot_product_attention(
        *(t.unflatten(2, (heads, head_dim)).transpose(1, 2) for t in (q, k, v)), scale=scale
    ).transpose(1, 2).flatten(2)  # fmt: skip
    out = nan_like((batch, n_q, channels), dtype)
    actual = flash_attention(q, k, v, heads, scale, out=out, config=config)
    assert actual is out and actual.dtype == dtype
    assert_within_rule(actual, eager, reference, dtype, f"Nq={n_q} Nk={n_k} heads={heads} {dtype} {magnitude}")


# Lengths: 1, primes, and just below / at / above block sizes: each case runs with the default blocks and with
# 16 x 16 blocks, so that tails inside a block and across several blocks are both exercised.
CASES = [
    # batch, Nq, Nk, heads, head_dim
    (1, 1, 1, 1, 64),
    (2, 17, 5, 1, 64),
    (1, 15, 16, 2, 32),
    (2, 33, 31, 3, 64),
    (1, 50, 13, 4, 48),  # head_dim not a power of two
    (1, 7, 29, 2, 128),
    (2, 65, 17, 1, 96),
    (1, 129, 64, 2, 64),  # one past two 64-blocks of queries, exactly one of keys
    (1, 3, 2, 16, 32),  # 16 heads
]
SMALL_BLOCKS = AttentionConfig(16, 16, 1, 1)


@pytest.mark.parametrize("config", [None, SMALL_BLOCKS], ids=["default-blocks", "16x16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_against_float64_definition(case, dtype, config):
    check_case(*case, dtype=dtype, seed=sum(case), config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 33, 47, 2, 64), (1, 20, 16, 1, 32), (3, 9, 40, 1, 64)], ids=str)
def test_large_scores(case, dtype):
    """Scores up to ~100 with one dominant key per image, across three 16-key blocks (the last one partial)."""
    check_case(*case, dtype=dtype, seed=7 + sum(case), config=SMALL_BLOCKS, magnitude="large")


@pytest.mark.parametrize("seed", range(6))
def test_random_lengths_and_heads(seed):
    rng = random.Random(seed)
    check_case(
        batch=rng.randint(1, 2),
        n_q=rng.choice([1, 2, 3, 5, 11, 16, 17, 31, 37, 63]),
        n_k=rng.choice([1, 2, 7, 13, 15, 16, 19, 32, 41]),
        heads=rng.randint(1, 6),
        head_dim=rng.choice([32, 40, 64, 80, 128]),
        dtype=torch.float32,
        seed=seed,
        config=rng.choice([None, SMALL_BLOCKS]),
        magnitude=rng.choice(["unit", "large"]),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heads_read_by_stride(dtype):
    check_case(2, 21, 9, 3, 32, dtype, seed=5, layout="strided")


def test_scale_is_an_argument_and_must_be_positive():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 64, generator=generator, dtype=torch.float64) for n in (9, 4, 4))
    for scale in (64**-0.5, 8**-0.5, 1.0):
        expected = definition(q, k, v, 1, scale)
        actual = flash_attention(*(t.float().to(DEVICE) for t in (q, k, v)), 1, scale)
        assert rel_err(actual.cpu(), expected) < 1e-5
    with pytest.raises(ValueError, match="scale must be positive"):
        flash_attention(*(t.float().to(DEVICE) for t in (q, k, v)), 1, -0.125)


def test_bad_shapes_are_refused():
    q = torch.randn(1, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="disagree|divisible"):
        flash_attention(q, torch.randn(1, 3, 32, device=DEVICE), torch.randn(1, 3, 32, device=DEVICE), 1, 0.1)
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, q.half(), q.half(), 1, 0.1)


# Every CvT-13 / CvT-21 / CvT-W24 stage at 224 and 384 (Nq, Nk, heads, head_dim 64).
STAGES = [
    (3136, 784, 1), (784, 196, 3), (197, 50, 6),  # CvT-13/21 at 224
    (9216, 2304, 1), (2304, 576, 3), (577, 145, 6),  # at 384
    (3136, 784, 3), (784, 196, 12), (197, 50, 16),  # CvT-W24 at 224
    (9216, 2304, 3), (2304, 576, 12), (577, 145, 16),  # at 384
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("magnitude", ["unit", "large"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_q, n_k, heads", STAGES)
def test_cvt_stage_shapes_on_gpu(n_q, n_k, heads, dtype, batch, magnitude):
    """The table's own configurations on every CvT stage: 64-row tiles at batch 1, 128-row ones at batch 16 where
    they make two waves."""
    check_case(batch, n_q, n_k, heads, 64, dtype, seed=n_q + heads, magnitude=magnitude)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reruns_are_bitwise_equal_on_gpu(dtype):
    """100 launches on the same inputs give the same bits: a moving answer is a race between programs."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(64, n, 192, generator=generator).to(DEVICE, dtype) for n in (785, 197, 197))
    first = flash_attention(q, k, v, 3, 192**-0.5)
    for _ in range(100):
        assert torch.equal(first, flash_attention(q, k, v, 3, 192**-0.5))
