"""Input validation: bad inputs get an error that names what is wrong and what was expected.

Shape and dtype checks only read metadata, so they cost nothing on the GPU and trace cleanly under torch.compile.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CvtConfig
from .errors import InputError, InputTypeError
from .ops import conv_output_size


def check_device(device) -> torch.device:
    """`device` as a torch.device that this machine has, or a ValueError that says why not."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a device name (expected e.g. 'cpu', 'cuda' or 'cuda:1')") from None
    if resolved.type == "meta":
        raise InputError(f"device {device!r} holds no data: a model moved there loses its weights")
    try:
        torch.empty(0, device=resolved)
    except Exception as error:  # by backend: RuntimeError, AssertionError (no CUDA build), ModuleNotFoundError, ...
        reason = " ".join(str(error).split()).split(". ")[0] or type(error).__name__
        raise InputError(f"device {device!r} is not available on this machine ({reason})") from None
    return resolved


def check_pixel_values(pixel_values, config: CvtConfig, first_conv: nn.Conv2d) -> None:
    if pixel_values is None:
        raise InputError("You have to specify pixel_values")
    if not isinstance(pixel_values, torch.Tensor):
        raise InputTypeError(
            f"pixel_values must be a torch.Tensor of shape (batch, {config.num_channels}, height, width), "
            f"got {type(pixel_values).__name__}; CvtImageProcessor turns images into one"
        )
    if pixel_values.ndim != 4:
        hint = (
            " (a single image? add a batch dimension with pixel_values.unsqueeze(0))" if pixel_values.ndim == 3 else ""
        )
        raise InputError(
            f"pixel_values must have 4 dimensions (batch, channels, height, width), got shape "
            f"{tuple(pixel_values.shape)}{hint}"
        )
    if not pixel_values.is_floating_point():
        raise InputTypeError(
            f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}; raw images need rescaling and "
            "normalisation first (CvtImageProcessor does both)"
        )
    batch, channels, height, width = pixel_values.shape
    if channels != config.num_channels:
        raise InputError(
            f"pixel_values has {channels} channels, but the model expects num_channels={config.num_channels} "
            f"(shape {tuple(pixel_values.shape)}, expected (batch, {config.num_channels}, height, width))"
        )
    if batch == 0:
        raise InputError("pixel_values has batch size 0")
    check_image_size(config, height, width)
    weight = first_conv.weight
    if pixel_values.device != weight.device and weight.device.type != "meta":
        raise InputError(
            f"pixel_values is on {pixel_values.device} but the model is on {weight.device}; "
            f"move one of them (pixel_values.to({str(weight.device)!r}) or model.to({str(pixel_values.device)!r}))"
        )
    if pixel_values.dtype != weight.dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        raise InputTypeError(
            f"pixel_values is {pixel_values.dtype} but the model's weights are {weight.dtype}; cast the input "
            f"(pixel_values.to({weight.dtype})) or the model, or run under torch.autocast"
        )


def check_image_size(config: CvtConfig, height: int, width: int) -> None:
    """A ValueError unless images of height x width pixels make sense for this model (and so can run through it)."""
    # Deliberately stricter than transformers (which runs e.g. 15x15 on CvT-13): below one last-stage token's worth
    # of pixels per side, every last-stage token is mostly padding.
    smallest = config.total_stride
    if height < smallest or width < smallest:
        raise InputError(
            f"image of {height}x{width} pixels is smaller than the model's total stride: height and width must be at "
            f"least {smallest} (the product of patch_stride {config.patch_stride[: config.num_stages]})"
        )
    _check_every_conv_has_output(config, height, width)


def _check_every_conv_has_output(config: CvtConfig, height: int, width: int) -> None:
    """Walk the stages: every patch embedding and q/k/v projection must leave at least one pixel per side."""
    for stage in range(config.num_stages):
        kernel, stride, padding = config.patch_sizes[stage], config.patch_stride[stage], config.patch_padding[stage]
        height, width = (conv_output_size(side, kernel, stride, padding) for side in (height, width))
        if min(height, width) < 1:
            raise InputError(f"the image is too small for stage {stage}'s patch embedding (kernel {kernel})")
        if config.qkv_projection_method[stage] == "linear":
            continue
        kernel = config.kernel_qkv[stage]
        for name in ("padding_q", "padding_kv"):
            padding = getattr(config, name)[stage]
            if min(height, width) + 2 * padding < kernel:
                raise InputError(
                    f"the image is too small for this model: stage {stage} has a {height}x{width} token grid, smaller "
                    f"than its q/k/v kernel ({kernel}) with {name} {padding}"
                )


def check_labels(labels, logits: torch.Tensor, problem_type: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise InputTypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    batch, num_labels = logits.shape
    shape = tuple(labels.shape)
    if labels.device != logits.device:
        raise InputError(f"labels are on {labels.device} but the logits are on {logits.device}")
    if problem_type == "single_label_classification":
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise InputTypeError(
                f"single-label classification needs integer class indices as labels, got {labels.dtype}"
            )
        if labels.numel() != batch or (labels.ndim > 1 and labels.shape[0] != batch):
            raise InputError(f"single-label classification needs labels of shape ({batch},), got {shape}")
        # A value check needs the values on the host: done on the CPU, where it is free; on the GPU the loss
        # kernel's own assertion catches it without a synchronisation here.
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            valid = (labels == -100) | ((labels >= 0) & (labels < num_labels))  # -100: CrossEntropyLoss's ignore_index
            if not bool(valid.all()):
                bad = labels[~valid].unique().tolist()
                raise InputError(f"labels must be class indices in [0, {num_labels}) (or -100 to ignore); got {bad}")
    elif problem_type == "multi_label_classification":
        if not labels.is_floating_point():
            raise InputTypeError(
                f"multi-label classification needs float targets of shape ({batch}, {num_labels}), got {labels.dtype}"
                " (for single-label classification pass integer class indices)"
            )
        if shape != (batch, num_labels):
            raise InputError(f"multi-label classification needs labels of shape ({batch}, {num_labels}), got {shape}")
    elif problem_type == "regression":
        if not labels.is_floating_point():
            raise InputTypeError(f"regression needs floating-point labels, got {labels.dtype}")
        expected = [(batch, num_labels)] + ([(batch,)] if num_labels == 1 else [])
        if shape not in expected:
            raise InputError(f"regression needs labels of shape {' or '.join(map(str, expected))}, got {shape}")
