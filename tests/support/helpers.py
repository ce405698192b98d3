"""Helpers for the tests: random configs transformers accepts, model pairs with shared random weights, statistics
that make every term matter (harden_statistics_), float64 oracles written from the definition of the two fused ops,
and the error measure of the kernel tests (error against float64, relative to the largest magnitude)."""

from __future__ import annotations

import random

import torch

import cvt_fast
from cvt_fast.ops import conv_output_size
from cvt_fast.testing import randomize_
from cvt_fast.testing import relative_error as rel_err  # noqa: F401  (the tests' short name for it)


def random_config_kwargs(seed: int, stages: int | None = None, **overrides) -> dict:
    """A random CvT that transformers can run: 1-3 stages, depth[s] > s, cls token only on the last stage, odd
    channel counts, strides and kernel sizes that vary, head_dim from 4 up."""
    rng = random.Random(seed)
    stages = stages or rng.randint(1, 3)
    heads = [rng.randint(1, 3) for _ in range(stages)]
    head_dims = [rng.choice([4, 6, 8, 12]) for _ in range(stages)]
    kernel = [rng.choice([1, 3, 5]) for _ in range(stages)]
    kwargs = dict(
        num_channels=rng.choice([1, 3, 4]),
        patch_sizes=[rng.choice([3, 5, 7]) for _ in range(stages)],
        patch_stride=[rng.choice([1, 2, 3, 4]) if s == 0 else rng.choice([1, 2]) for s in range(stages)],
        patch_padding=[rng.choice([0, 1, 2]) for _ in range(stages)],
        embed_dim=[h * d for h, d in zip(heads, head_dims, strict=True)],
        num_heads=heads,
        depth=[s + rng.randint(1, 2) for s in range(stages)],
        mlp_ratio=[rng.choice([1.0, 2.0, 4.0]) for _ in range(stages)],
        qkv_bias=[rng.random() < 0.7 for _ in range(stages)],
        cls_token=[False] * (stages - 1) + [rng.random() < 0.6],
        kernel_qkv=kernel,
        padding_q=[k // 2 for k in kernel],
        padding_kv=[rng.choice([0, k // 2]) for k in kernel],
        stride_q=[1] * stages,  # anything else breaks the residual (transformers crashes; CvtConfig refuses it)
        stride_kv=[rng.choice([1, 2, 2]) for _ in range(stages)],
        drop_path_rate=[0.0] * stages,
        num_labels=rng.choice([1, 2, 5]),
    )
    kwargs.update(overrides)
    return kwargs


# A small CvT that transformers can run and that trains in a second: two stages, a cls token on the last, no stochastic
# depth (so that two runs of a training step can be held to equality). head_dim 16 or 32 (the kernels take 32 up).
TRAINABLE = dict(
    embed_dim=[32, 64],
    num_heads=[1, 2],
    depth=[1, 2],
    cls_token=[False, True],
    patch_sizes=[7, 3],
    patch_stride=[4, 2],
    patch_padding=[2, 1],
    drop_path_rate=[0.0, 0.0],
)


def model_pair(config_kwargs: dict, head: bool = True, seed: int = 0):
    """(transformers model, cvt_fast model) with the same random weights and BatchNorm statistics, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    hf_class = transformers.CvtForImageClassification if head else transformers.CvtModel
    ours_class = cvt_fast.CvtForImageClassification if head else cvt_fast.CvtModel
    hf = hf_class(transformers.CvtConfig(**config_kwargs))
    randomize_(hf, torch.Generator().manual_seed(seed))
    ours = ours_class(cvt_fast.CvtConfig(**config_kwargs))
    ours.load_state_dict(hf.state_dict())
    return hf.eval(), ours.eval()


def min_side(config_kwargs: dict) -> int:
    return cvt_fast.CvtConfig(**config_kwargs).total_stride


def valid_image_side(config_kwargs: dict, side: int) -> bool:
    """Whether every conv of the model (patch embeddings, q/k/v projections) has at least one output pixel."""
    config = cvt_fast.CvtConfig(**config_kwargs)
    if side < config.total_stride:
        return False
    for s in range(config.num_stages):
        side = conv_output_size(side, config.patch_sizes[s], config.patch_stride[s], config.patch_padding[s])
        k = config.kernel_qkv[s]
        if side < 1 or side + 2 * config.padding_q[s] < k or side + 2 * config.padding_kv[s] < k:
            return False
    return True


def random_image_size(config_kwargs: dict, seed: int) -> tuple[int, int]:
    """An odd-ish, usually non-square (height, width) that the model accepts."""
    rng = random.Random(seed)
    base = max(cvt_fast.CvtConfig(**config_kwargs).total_stride, 8)
    while True:
        height, width = base * rng.randint(1, 3) + rng.randint(0, 5), base * rng.randint(1, 3) + rng.randint(0, 5)
        if valid_image_side(config_kwargs, height) and valid_image_side(config_kwargs, width):
            return height, width


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu" runs the kernels in Triton's interpreter
FLOORS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_within_rule(kernel_out, eager_out, reference, dtype, what=""):
    """The kernels' accuracy rule: error(kernel vs float64 reference) <= 2 x error(eager PyTorch in the same dtype)
    + a floor (1e-5 float32, 1e-3 float16, 1e-2 bfloat16)."""
    kernel_err, eager_err = rel_err(kernel_out, reference), rel_err(eager_out, reference)
    bound = 2 * eager_err + FLOORS[dtype]
    assert torch.isfinite(kernel_out).all(), f"{what}: non-finite values (an element left unwritten?)"
    assert kernel_err <= bound, f"{what}: kernel error {kernel_err:.2e} > 2 x eager {eager_err:.2e} + floor"


def fused_ops(layer_paths: dict) -> dict:
    """The paths of the two fused ops in one layer's kernel_paths() entry (which also names the linear layers')."""
    return {op: path for op, path in layer_paths.items() if op in ("qkv_projection", "attention")}


def nan_like(shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@torch.no_grad()
def harden_statistics_(models, generator: torch.Generator, small_fraction: float = 0.25, qk_gain: float = 1.5):
    """Give the same models (same module names: transformers' and cvt_fast's) statistics under which every term of the
    eval-mode projections matters, identically on each. BatchNorm: in about `small_fraction` of the channels the
    running variance drops to 1e-4..1e-3 (gamma scaled by its square root, so that outputs stay O(1) as in a trained
    network), and each BatchNorm gets its own eps in 1e-5..1e-3, so q, k and v of a layer differ. eps is then 1% to
    10x the variance: dropping it, or taking another projection's, moves those channels by 0.5% or more, where the
    default statistics (variances 0.5..2, eps 1e-5 everywhere) move them by ~1e-5, under the parity tolerance. eps is
    not in the state dict, so it is set on the modules. Query and key weights are scaled by `qk_gain`, which takes
    attention scores to ~50 (~5 by default): large, yet far enough from saturation that two float32 implementations
    still agree to a few 1e-6."""
    first = models[0]
    for name, module in first.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            small = torch.rand(channels, generator=generator, dtype=torch.float64) < small_fraction
            variance = module.running_var.double().clone()
            variance[small] = 10 ** -(3 + torch.rand(int(small.sum()), generator=generator, dtype=torch.float64))
            gamma_scale = torch.where(small, variance.sqrt(), torch.ones_like(variance))
            eps = float(10 ** -(3 + 2 * torch.rand((), generator=generator, dtype=torch.float64)))
            for model in models:
                target = model.get_submodule(name)
                target.running_var.copy_(variance)
                target.weight.mul_(gamma_scale.to(target.weight.dtype))
                target.eps = eps
        elif isinstance(module, torch.nn.Linear) and name.endswith(("projection_query", "projection_key")):
            for model in models:
                model.get_submodule(name).weight.mul_(qk_gain)
    return models


def qkv_projection_definition(x, height, width, with_cls, weights, bn_params, eps, strides):
    """q, k, v in float64 from the definition, for oracles independent of cvt_fast's fold: each projection a
    depthwise conv of the (B, C, H, W) grid, then BatchNorm on running statistics, (y - mean) / sqrt(var + eps) *
    gamma + beta, back in token layout with the cls row (never convolved) in front. weights [q, k, v] (C, 1, k, k);
    bn_params [gamma, beta, mean, var] for q, then k, then v; eps and strides [(stride, padding)] for q, k, v."""
    x = x.double()
    cls, tokens = (x[:, :1], x[:, 1:]) if with_cls else (None, x)
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    outputs = []
    for i, (stride, padding) in enumerate(strides):
        gamma, beta, mean, var = (t.double()[:, None, None] for t in bn_params[4 * i : 4 * i + 4])
        y = torch.nn.functional.conv2d(grid, weights[i].double(), stride=stride, padding=padding, groups=channels)
        y = ((y - mean) / torch.sqrt(var + eps[i]) * gamma + beta).flatten(2).transpose(1, 2)
        outputs.append(y if cls is None else torch.cat((cls, y), dim=1))
    return outputs


def attention_definition(q, k, v, num_heads, scale):
    """softmax(q k^T * scale) v per head in float64; q (B, Nq, C), k and v (B, Nk, C), heads side by side in C."""
    qh, kh, vh = (t.double().unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)
    return (probs @ vh).transpose(1, 2).flatten(2)
