"""What every launcher needs besides its kernel: the right device, the size of the machine it fills, and whether
Triton runs in its interpreter. Imports no Triton, so that cvt_fast can ask without it."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# Read once, when cvt_fast.kernels is first imported: Triton itself reads it once, when it is first imported.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Hopper's multiprocessor count (H100 SXM and H200), for tensors that are not on a GPU: the sm_90 compile check,
# which drives the launchers with CPU tensors to compile exactly what a launch would.
HOPPER_SMS = 132


def launch_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* CUDA device and stream: make that the tensor's device (a model on cuda:1
    while the current device is 0 would otherwise run its kernels on the wrong GPU)."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return HOPPER_SMS
