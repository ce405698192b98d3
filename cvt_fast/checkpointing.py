"""Gradient checkpointing of CvT layers: activations recomputed in the backward pass instead of kept.

A CvT layer holds BatchNorm (in the q/k/v projections), which in training updates its running statistics on every
forward. Checkpointing runs the layer's forward twice, so done naively it would count each batch twice; the
recomputation here runs with those updates switched off, so running statistics, like outputs and gradients, are
exactly those of the same step without checkpointing. Dropout and stochastic depth draw the same random numbers
in the recomputation (PyTorch restores the RNG state). Under torch.compile, AOTAutograd plans the recomputation
itself: it replays values, never the in-place buffer updates (those run once, at the end of the forward graph),
so no freezing is needed there, and none could be traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import InputError


@contextlib.contextmanager
def batchnorm_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorms in `module` that would update running statistics leave them (and their batch count) as found:
    momentum 0 keeps the running mean and variance, and the count is put back afterwards."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def checkpointed_call(layer: nn.Module, *args: Any, **checkpoint_kwargs: Any) -> Any:
    """layer(*args), its activations recomputed in backward; BatchNorm statistics updated once, in the forward."""
    if torch.compiler.is_compiling():
        return checkpoint(layer, *args, use_reentrant=False, **checkpoint_kwargs)
    context: Callable = lambda: (contextlib.nullcontext(), batchnorm_statistics_frozen(layer))  # noqa: E731
    return checkpoint(layer, *args, use_reentrant=False, context_fn=context, **checkpoint_kwargs)


def checked_checkpoint_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """What gradient_checkpointing_enable(gradient_checkpointing_kwargs=...) may pass on to torch's checkpoint."""
    kwargs = dict(kwargs or {})
    if kwargs.pop("use_reentrant", False):
        raise InputError(
            "gradient_checkpointing_kwargs use_reentrant=True is not supported: cvt_fast recomputes layers without "
            "reentrancy, which is what lets BatchNorm count each batch once"
        )
    if "context_fn" in kwargs:
        raise InputError("gradient_checkpointing_kwargs context_fn is cvt_fast's own (it freezes BatchNorm statistics)")
    return kwargs


__all__ = ["batchnorm_statistics_frozen", "checked_checkpoint_kwargs", "checkpointed_call"]
