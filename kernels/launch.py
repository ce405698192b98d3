"""What every launcher needs besides its kernel: the right device, and the size of the machine it fills."""

from __future__ import annotations

import contextlib
import functools

import torch

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
