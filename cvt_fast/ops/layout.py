"""Token layout (B, [1 +] H*W, C), the grids the convolutions see, and the heads attention sees: views, not copies."""

from __future__ import annotations

import torch


def split_cls(x: torch.Tensor, with_cls: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(B, [1 +] N, C) -> cls (B, 1, C) or None, tokens (B, N, C); both views."""
    return (x[:, :1], x[:, 1:]) if with_cls else (None, x)


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a view: channels-last memory, which the convolutions read directly."""
    grid = tokens.transpose(1, 2).unflatten(2, (height, width))
    batch, channels = grid.shape[:2]
    if batch == 1 and tokens.stride(1) == channels and tokens.stride(2) == 1:
        # With one image the batch stride is free, and the view leaves a value that PyTorch does not recognise as
        # channels-last: the CPU conv would then copy to NCHW and take its slow path.
        grid = grid.as_strided(grid.shape, (height * width * channels, 1, width * channels, channels))
    return grid


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view when the grid is in channels-last memory."""
    return grid.flatten(2).transpose(1, 2)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, head_dim) as a view."""
    return t.unflatten(2, (num_heads, t.shape[2] // num_heads)).transpose(1, 2)
