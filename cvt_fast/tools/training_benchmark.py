"""Training benchmark (`cvt-fast bench --train`): one fine-tuning step (forward with labels, backward, AdamW step) of
cvt_fast against transformers' model with the same weights, with the step's peak memory beside its speed and the
gradients of one step (dropout and stochastic depth off) against transformers' beside both (see _grad_error);
each contender's error is against float64, so transformers' own error is the scale of cvt_fast's.
The contenders run interleaved in short blocks (cvt_fast/timing.py), on either device; medians."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..timing import interleaved
from .models import random_model, transformers_twin
from .reporting import DTYPES, device_name, markdown_table, versions, write_records

IMPLEMENTATIONS = ("transformers", "cvt_fast")


@dataclass
class TrainRecord:
    device: str
    torch_version: str
    transformers_version: str | None
    model: str
    image_size: int
    batch: int
    dtype: str  # float32, or bfloat16 / float16 as autocast over float32 weights
    implementation: str
    steps_per_s: float | None
    images_per_s: float | None
    peak_mem_bytes: int | None  # CUDA: what a step allocates over what it found
    saved_bytes: int | None  # what autograd keeps for backward (activations, and the weights it needs), any device
    grad_err: float | None  # against float64 gradients of the same step (see _grad_error)
    threads: int | None = None
    error: str | None = None


def _step(model, x, labels, dtype, device) -> torch.Tensor:
    """One forward with labels under autocast (when dtype is not float32) and its backward; the loss."""
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        loss = model(pixel_values=x, labels=labels).loss
    loss.backward()
    return loss


def _grad_error(model, reference) -> float:
    """The largest, over the parameters, of max|g - g_ref| / max|g_ref|; where a reference gradient is smaller than
    1e-4 of the model's largest, relative to that instead: the key projection's bias has an exact gradient of zero
    (softmax ignores a shift shared by all keys), so what both models give there is rounding noise."""
    grads = [(p.grad.double(), r.grad.double()) for p, r in zip(model.parameters(), reference.parameters(), strict=True)
             if r.grad is not None]  # fmt: skip
    floor = 1e-4 * max(r.abs().max().item() for _, r in grads)
    return max(((g - r).abs().max() / max(r.abs().max().item(), floor)).item() for g, r in grads)


def _deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """The model with dropout and stochastic depth off: float64 draws other random numbers than float32."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    return model


def _gradients(models: dict[str, torch.nn.Module], x, labels, dtype, device) -> dict[str, float]:
    """Each contender's gradient error against float64 (transformers' model in float64) on one step from the same
    weights."""
    copies = {name: _deterministic(copy.deepcopy(model)) for name, model in models.items()}
    float64 = copy.deepcopy(copies["transformers"]).double()
    for model in (*copies.values(), float64):
        model.zero_grad(set_to_none=True)
    _step(float64, x.double(), labels, torch.float32, device)
    errors = {}
    for name, model in copies.items():
        _step(model, x, labels, dtype, device)
        errors[name] = _grad_error(model, float64)
    return errors


def saved_for_backward_bytes(fn: Callable[[], object]) -> int:
    """The bytes of the tensors autograd keeps for backward while fn runs (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def train_case(
    model_name: str, image_size: int, batch: int, dtype_name: str, device: torch.device, rounds: int,
    progress: Callable[[str], None] = lambda _: None,
) -> list[TrainRecord]:  # fmt: skip
    dtype = DTYPES[dtype_name]
    found = versions()
    generator = torch.Generator().manual_seed(0)
    base = random_model(model_name, generator).to(device).train()
    config = base.config
    x = torch.randn(batch, config.num_channels, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, max(config.num_labels, 1), (batch,), generator=generator).to(device)
    models = {"transformers": transformers_twin(base).to(device).train(), "cvt_fast": base}

    def record(name, **fields):
        return TrainRecord(
            device=device_name(device), torch_version=found["torch"], transformers_version=found["transformers"],
            model=model_name, image_size=image_size, batch=batch, dtype=dtype_name, implementation=name,
            threads=torch.get_num_threads() if device.type == "cpu" else None,
            **{"steps_per_s": None, "images_per_s": None, "peak_mem_bytes": None, "saved_bytes": None,
               "grad_err": None, **fields},
        )  # fmt: skip

    progress(f"{model_name} {image_size}px batch {batch} {dtype_name}: gradients against transformers'")
    errors = _gradients(models, x, labels, dtype, device)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}

    def train_step(name):
        optimizers[name].zero_grad(set_to_none=True)
        _step(models[name], x, labels, dtype, device)
        optimizers[name].step()

    peaks, saved = {}, {}
    for name in models:  # warm (the optimizer's state is made on its first step), then the memory of one step
        saved[name] = saved_for_backward_bytes(lambda name=name: train_step(name))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            train_step(name)
            torch.cuda.synchronize(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) - before
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timings = interleaved(
        {name: lambda r, name=name: train_step(name) for name in models}, rounds, synchronize,
        progress=lambda r: progress(f"{model_name} {image_size}px batch {batch} {dtype_name}: round {r + 1}/{rounds}"),
    )  # fmt: skip
    records = []
    for name in models:
        seconds = timings[name].seconds
        speed = dict(steps_per_s=1 / seconds, images_per_s=batch / seconds)
        records.append(record(name, **speed, peak_mem_bytes=peaks.get(name), saved_bytes=saved[name],
                              grad_err=errors[name]))  # fmt: skip
    return records


def run_training(
    models: list[str], sizes: list[int], batches: list[int], dtypes: list[str], device: torch.device, rounds: int,
    out_dir: Path | None = None,
) -> list[TrainRecord]:  # fmt: skip
    records = []
    for model in models:
        for size in sizes:
            for batch in batches:
                for dtype in dtypes:
                    for r in train_case(model, size, batch, dtype, device, rounds):
                        records.append(r)
                        peak = f", peak {r.peak_mem_bytes / 2**20:.0f} MiB" if r.peak_mem_bytes is not None else ""
                        print(f"{model} {size}px batch {batch:>3} {dtype:>8}  train step  {r.implementation:<13} "
                              f"{r.images_per_s:7.1f} images/s  kept for backward {r.saved_bytes / 2**20:.0f} MiB"
                              f"{peak}  grad err {r.grad_err:.1e} against float64", flush=True)  # fmt: skip
    if out_dir is not None:
        header = ["model", "size", "batch", "dtype", "implementation", "images/s", "vs transformers",
                  "kept for backward MiB", "peak MiB", "grad err vs float64"]  # fmt: skip
        rows = []
        case = lambda r: (r.model, r.image_size, r.batch, r.dtype)  # noqa: E731
        for r in records:
            base = next(b for b in records if b.implementation == "transformers" and case(b) == case(r))
            mem = f"{r.peak_mem_bytes / 2**20:.0f}" if r.peak_mem_bytes is not None else "-"
            rows.append((r.model, r.image_size, r.batch, r.dtype, r.implementation, f"{r.images_per_s:.1f}",
                         f"{r.images_per_s / base.images_per_s:.2f}x", f"{r.saved_bytes / 2**20:.0f}", mem,
                         f"{r.grad_err:.1e}"))  # fmt: skip
        written = write_records(out_dir, "train", records, markdown_table(header, rows))
        print(f"results written to {', '.join(str(path) for path in written)}")
    return records
