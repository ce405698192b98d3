"""One training step of cvt_fast models across processes, as users run them: DDP, DDP with globally synchronised
BatchNorm, FSDP (fully_shard), and torch.compile of a DDP model. tests/test_distributed.py launches this file under
torchrun (2 processes, gloo on the CPU; nccl with --cuda) and compares what rank 0 saves with single-process
references built from the same functions.

Everything runs in float64, so that "the same gradients" can be held to 1e-10 rather than to float32 noise, and with
dropout and stochastic depth off: each process would draw its own random numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import cvt_fast
from cvt_fast.testing import randomize_

GLOBAL_BATCH = 6  # 3 images per process with 2 processes


def small_config() -> cvt_fast.CvtConfig:
    """Two stages, a cls token on the last, channel counts that are not powers of two."""
    return cvt_fast.CvtConfig(
        depth=[1, 2], embed_dim=[12, 24], num_heads=[1, 2], cls_token=[False, True], drop_path_rate=[0.0, 0.0],
        num_labels=3,
    )  # fmt: skip


def narrow_cvt21_config() -> cvt_fast.CvtConfig:
    """CvT-21's structure (depths 1, 4, 16; 1, 3, 6 heads; its kernels, strides and cls token) at a quarter of its
    widths (16, 48, 96 instead of 64, 192, 384): the layer count and sharding units of the real model, in seconds."""
    config = cvt_fast.preset("cvt-21").config()
    config.update(embed_dim=[16, 48, 96], drop_path_rate=[0.0, 0.0, 0.0], num_labels=5)
    return cvt_fast.CvtConfig(**config.to_dict())


def make_model(config: cvt_fast.CvtConfig, device="cpu") -> cvt_fast.CvtForImageClassification:
    model = cvt_fast.CvtForImageClassification(config)
    return randomize_(model, torch.Generator().manual_seed(0)).to(device, torch.float64).train()


def make_batch(side: tuple[int, int], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch; process r trains on rows [3r, 3r + 3)."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(GLOBAL_BATCH, 3, *side, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
    return pixels.to(device), labels.to(device)


def rows(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per_process = tensor.shape[0] // world_size
    return tensor[rank * per_process : (rank + 1) * per_process]


def train_step(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> None:
    model(pixels, labels=labels).loss.backward()


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> gradient, whole (an FSDP gradient is a sharded DTensor: gathered), on the CPU."""
    found = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        found[name.removeprefix("module.").removeprefix("_orig_mod.").removeprefix("module.")] = grad.detach().cpu()
    return found


def batchnorm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix("module."): value.detach().cpu().clone()
        for name, value in model.state_dict().items()
        if name.endswith(("running_mean", "running_var"))
    }


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """torch.nn.SyncBatchNorm's arithmetic for CPU tensors, which it refuses: in training, the statistics of every
    process's batch together, through a differentiable all_reduce (so the backward pass is global too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = totals[channels : 2 * channels] / n - mean * mean  # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as BatchNorm tracks
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]


def globalise_batchnorm(model: nn.Module) -> int:
    """Every BatchNorm2d replaced by GlobalBatchNorm2d with the same state, as convert_sync_batchnorm does (with
    SyncBatchNorm); the number replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight)
                replacement.load_state_dict(child.state_dict())
                setattr(parent, name, replacement)
                replaced += 1
    return replaced


# ---- the scenarios, each rank running its rows of the batch -----------------------------------------------------


def ddp(rank: int, world_size: int, device: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(small_config(), device)
    pixels, labels = make_batch((19, 23), device)
    wrapped = DistributedDataParallel(model)
    train_step(wrapped, rows(pixels, rank, world_size), rows(labels, rank, world_size))
    return {"grads": gradients(wrapped), "stats": batchnorm_statistics(wrapped)}


def global_batchnorm(rank: int, world_size: int, device: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(small_config(), device)
    if device == "cpu":
        replaced = globalise_batchnorm(model)
    else:  # on GPUs, PyTorch's own
        before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        replaced = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) if before else 0
    pixels, labels = make_batch((19, 23), device)
    wrapped = DistributedDataParallel(model)
    train_step(wrapped, rows(pixels, rank, world_size), rows(labels, rank, world_size))
    return {"grads": gradients(wrapped), "stats": batchnorm_statistics(wrapped), "replaced": replaced}


def sync_batchnorm_on_cpu(rank: int, world_size: int, device: str) -> dict:
    """What PyTorch's SyncBatchNorm says of CPU tensors once a process group exists (why the stand-in above exists)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(make_model(small_config()))
    pixels, labels = make_batch((19, 23))
    try:
        train_step(model, rows(pixels, rank, world_size), rows(labels, rank, world_size))
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


def fsdp(rank: int, world_size: int, device: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = make_model(narrow_cvt21_config(), device)
    for stage in model.cvt.encoder.stages:
        for layer in stage.layers:  # one sharding unit per transformer layer, as for any transformer
            fully_shard(layer)
    fully_shard(model)
    pixels, labels = make_batch((32, 32), device)
    train_step(model, rows(pixels, rank, world_size), rows(labels, rank, world_size))
    return {"grads": gradients(model)}


def compiled_ddp(rank: int, world_size: int, device: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(small_config(), device)
    pixels, labels = make_batch((19, 23), device)
    # aot_eager traces the forward and the backward graphs as inductor would, without its minutes of code generation
    compiled = torch.compile(DistributedDataParallel(model), backend="aot_eager")
    train_step(compiled, rows(pixels, rank, world_size), rows(labels, rank, world_size))
    return {"grads": gradients(compiled)}


SCENARIOS = {
    "ddp": ddp,
    "global_batchnorm": global_batchnorm,
    "sync_batchnorm_on_cpu": sync_batchnorm_on_cpu,
    "fsdp": fsdp,
    "compiled_ddp": compiled_ddp,
}


def main(out: Path, cuda: bool) -> None:
    import os
    import warnings

    import torch.distributed as dist

    # DDP notes that the depthwise weights' gradients (C, 1, k, k) have other strides than its buckets, a size-1
    # dimension's stride being arbitrary: harmless, and noise in a test log.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    names = ["ddp", "global_batchnorm"] if cuda else list(SCENARIOS)
    for name in names:
        result = SCENARIOS[name](rank, world_size, device)
        if rank == 0:
            torch.save(result, out / f"{name}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), cuda="--cuda" in sys.argv[2:])
