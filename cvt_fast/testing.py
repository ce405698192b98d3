"""What tests, benchmarks and every check of a result against a reference share: random weights (never time or test
on a default initialisation, whose BatchNorm is the identity and whose zero biases hide a wrong broadcast); the one
relative error every numerics rule is stated in; and float32 that is float32 for accuracy checks on a GPU."""

from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference relative to the largest magnitude of `expected`, in float64 (an elementwise
    relative error is meaningless next to zero). NaN where `actual` has a NaN."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_(model: torch.nn.Module, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Fill every floating-point parameter and buffer with random values of a sensible scale: weights ~ fan_in^-0.5
    (activations stay O(1) through deep stacks), norm scales around 1, BatchNorm running variance in [0.5, 2]."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
        if name.endswith("running_var"):
            value = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 1.5 + 0.5
        elif name.endswith("running_mean"):
            value = 0.2 * noise
        elif name.endswith(".weight") and tensor.ndim == 1:  # LayerNorm / BatchNorm scale
            value = 1 + 0.1 * noise
        elif tensor.ndim == 1:  # biases
            value = 0.05 * noise
        else:  # conv / linear weights, cls tokens
            value = noise * max(tensor.shape[1:].numel(), 1) ** -0.5  # fan_in (a zero-width layer has no values)
        tensor.copy_(value)
    return model


def float32_without_tf32() -> None:
    """CUDA convolutions in full float32 from here on. PyTorch lets cuDNN run float32 convolutions in TF32 (a 10-bit
    mantissa, against float32's 23) by default: a float32 reference (transformers') is then not float32, and a 2e-5
    parity rule cannot hold. Matrix products already default to full float32. Set through the flag that every
    PyTorch since 1.7 reads (the newer per-backend API refuses to be mixed with it)."""
    torch.backends.cudnn.allow_tf32 = False
