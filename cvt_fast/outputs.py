"""Model outputs with transformers' field names and access patterns: out.logits, out["logits"], out[0]."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


class ModelOutput:
    """Attribute, key and index access; integer indices and to_tuple() skip fields that are None, as in
    transformers, so `out[0]` is the first field that was actually returned."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BaseModelOutputWithCLSToken(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (B, C, H, W) of the last stage
    cls_token_value: torch.Tensor | None = None  # (B, 1, C) when the last stage has a cls token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # one (B, C_s, H_s, W_s) per stage


@dataclass
class ImageClassifierOutputWithNoAttention(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, num_labels)
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class BackboneOutput(ModelOutput):
    """transformers' BackboneOutput fields, plus the chosen stages' cls tokens when asked for."""

    feature_maps: tuple[torch.Tensor, ...] | None = None  # one (B, C_s, H_s, W_s) per out_features stage
    hidden_states: tuple[torch.Tensor, ...] | None = None  # every stage's map, with output_hidden_states
    attentions: None = None  # CvT's flash attention never materialises attention probabilities
    cls_tokens: tuple[torch.Tensor | None, ...] | None = None  # (B, 1, C_s) per out_features stage, None without one
