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
from dataclasses import dataclass
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


def checkpointed_call(layer: nn.Module, *args: Any, offload: bool = False, **checkpoint_kwargs: Any) -> Any:
    """layer(*args), its activations recomputed in backward; BatchNorm statistics updated once, in the forward. With
    `offload`, what the checkpoint keeps for backward (the layer's inputs) waits in CPU memory."""
    keep = (
        torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload else contextlib.nullcontext()
    )
    with keep:
        if torch.compiler.is_compiling():
            return checkpoint(layer, *args, use_reentrant=False, **checkpoint_kwargs)
        context: Callable = lambda: (contextlib.nullcontext(), batchnorm_statistics_frozen(layer))  # noqa: E731
        return checkpoint(layer, *args, use_reentrant=False, context_fn=context, **checkpoint_kwargs)


@dataclass(frozen=True)
class CheckpointPlan:
    """Which layers recompute their activations in backward, and how: every `every_n_layers`-th layer of the model
    (counted across stages, the first one included), their saved inputs on the CPU with `offload`, `kwargs` passed on
    to torch.utils.checkpoint.checkpoint."""

    kwargs: dict[str, Any]
    every_n_layers: int = 1
    offload: bool = False

    def covers(self, layer_index: int) -> bool:
        return layer_index % self.every_n_layers == 0


def checkpoint_plan(kwargs: dict[str, Any] | None, every_n_layers: Any = 1, offload: Any = False) -> CheckpointPlan:
    """A CheckpointPlan from what gradient_checkpointing_enable (or transformers' newer name for it,
    activation_checkpointing_enable) was given; a refusal names what does not fit."""
    if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
        raise InputError(f"every_n_layers must be a whole number of at least 1, got {every_n_layers!r}")
    if not isinstance(offload, bool):
        raise InputError(f"offload must be True or False, got {offload!r}")
    return CheckpointPlan(checked_checkpoint_kwargs(kwargs), every_n_layers, offload)


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


class CheckpointedLayers(nn.Module):
    """A stage's run over its layers, each recomputed in backward where the model's plan covers it.
    `gradient_checkpointing` holds the plan while enabled; `first_layer` is the index of the stage's first layer in
    the whole model (plans count layers across stages)."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing: CheckpointPlan | None = None
        self.first_layer = 0

    def run_layers(self, layers: nn.Sequential, hidden_state: torch.Tensor, *args: Any) -> torch.Tensor:
        plan = self.gradient_checkpointing if self.training and torch.is_grad_enabled() else None
        for index, layer in enumerate(layers, self.first_layer):
            if plan is not None and plan.covers(index):  # activations recomputed in backward, one layer at a time
                hidden_state = checkpointed_call(layer, hidden_state, *args, offload=plan.offload, **plan.kwargs)
            else:
                hidden_state = layer(hidden_state, *args)
        return hidden_state


class GradientCheckpointingMixin:
    """transformers' gradient checkpointing methods (and their newer activation_ names), for a model whose stages
    are CheckpointedLayers."""

    supports_gradient_checkpointing = True

    def _checkpointed_stages(self) -> list[CheckpointedLayers]:
        return [m for m in self.modules() if isinstance(m, CheckpointedLayers)]

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Recompute each layer's activations in the backward pass instead of keeping them (training memory per
        stage drops to one layer's activations), as transformers' models offer: every layer, or every
        `every_n_layers`-th; `offload` keeps what the checkpoints save on the CPU. BatchNorm statistics, outputs and
        gradients are those of the same step without it."""
        plan = checkpoint_plan(gradient_checkpointing_kwargs, every_n_layers, offload)
        for stage in self._checkpointed_stages():
            stage.gradient_checkpointing = plan

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers' newer name for gradient_checkpointing_enable (Trainer calls it)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        for stage in self._checkpointed_stages():
            stage.gradient_checkpointing = None

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(stage.gradient_checkpointing is not None for stage in self._checkpointed_stages())

    is_activation_checkpointing = is_gradient_checkpointing


__all__ = [
    "CheckpointPlan", "CheckpointedLayers", "GradientCheckpointingMixin", "batchnorm_statistics_frozen",
    "checkpoint_plan", "checkpointed_call",
]  # fmt: skip
