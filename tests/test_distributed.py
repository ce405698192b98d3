"""cvt_fast models are plain nn.Modules: they train under DDP, FSDP and torch.compile across processes.

tests/support/distributed_training.py runs one training step per scenario under torchrun (2 processes, gloo, CPU,
float64); the references here are single-process steps on the same model and batch.

BatchNorm (the q/k/v projections) normalises in training with the statistics of the batch it sees, which under DDP is
each process's own share, exactly as in transformers. So DDP over 2 x 3 images equals one process stepping over each
3-image half and averaging the gradients (the per-shard reference), and not one process over all 6, whose statistics
are those of the whole batch; with globally synchronised BatchNorm (SyncBatchNorm on GPUs), it equals the latter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from support import distributed_training as dt

pytestmark = pytest.mark.ecosystem

HERE = Path(__file__).resolve().parent
WORLD_SIZE = 2


def run_scenarios(out: Path, *extra: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
         str(HERE / "support" / "distributed_training.py"), str(out), *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references are thousands of small float64 ops (a float64 depthwise convolution runs channel by channel):
    with two OpenMP threads on a busy two-core machine they took 10 to 100 s, with one thread under a second. The
    torchrun processes get one thread each from torchrun."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Rank 0's results of every scenario (one torchrun for all of them: its start-up is most of the time)."""
    out = tmp_path_factory.mktemp("distributed")
    run_scenarios(out)
    return {path.stem: torch.load(path) for path in out.glob("*.pt")}


def stepped(config, pixels, labels) -> nn.Module:
    model = dt.make_model(config)
    dt.train_step(model, pixels, labels)
    return model


def per_shard_reference(config, side) -> tuple[dict, list[dict]]:
    """One process, each process's rows in turn from the same start: the average gradient, and each shard's BatchNorm
    statistics."""
    pixels, labels = dt.make_batch(side)
    shards = [
        stepped(config, dt.rows(pixels, r, WORLD_SIZE), dt.rows(labels, r, WORLD_SIZE)) for r in range(WORLD_SIZE)
    ]
    grads = [dt.gradients(model) for model in shards]
    average = {name: sum(g[name] for g in grads) / WORLD_SIZE for name in grads[0]}
    return average, [dt.batchnorm_statistics(model) for model in shards]


def whole_batch_reference(config, side) -> tuple[dict, dict]:
    """One process, the whole batch at once."""
    model = stepped(config, *dt.make_batch(side))
    return dt.gradients(model), dt.batchnorm_statistics(model)


def differences(actual: dict, expected: dict) -> dict[str, float]:
    """name -> largest difference relative to the reference's largest magnitude, or to a millionth of the largest in
    the model for a gradient that is zero in exact arithmetic (the key projection's BatchNorm bias: adding a constant
    to every key adds the same to a query's scores, which softmax ignores), where rounding noise is all there is."""
    assert actual.keys() == expected.keys()
    model_scale = max(t.abs().max().item() for t in expected.values())
    found = {}
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        scale = max(expected[name].abs().max().item(), 1e-6 * model_scale)
        found[name] = (actual[name] - expected[name]).abs().max().item() / scale
    return found


def assert_same(actual: dict, expected: dict, tolerance: float = 1e-10) -> None:
    worst = max(differences(actual, expected).items(), key=lambda item: item[1])
    assert worst[1] <= tolerance, worst


def test_ddp_gradients_are_the_per_process_batchnorm_reference_and_not_the_whole_batch(saved):
    per_shard, shard_statistics = per_shard_reference(dt.small_config(), (19, 23))
    assert_same(saved["ddp"]["grads"], per_shard)
    assert_same(saved["ddp"]["stats"], shard_statistics[0])  # rank 0's statistics: its own rows only
    whole, _ = whole_batch_reference(dt.small_config(), (19, 23))
    # Not a rounding matter: per-process statistics change the gradients at the percent level.
    assert max(differences(saved["ddp"]["grads"], whole).values()) > 1e-3


def test_global_batchnorm_under_ddp_gives_the_whole_batch_gradients_and_statistics(saved):
    result = saved["global_batchnorm"]
    assert result["replaced"] == 3 * sum(dt.small_config().depth)  # q, k and v of every layer
    whole, whole_statistics = whole_batch_reference(dt.small_config(), (19, 23))
    assert_same(result["grads"], whole)
    assert_same(result["stats"], whole_statistics)


def test_pytorchs_sync_batchnorm_refuses_cpu_tensors_in_a_process_group(saved):
    """Why the CPU test uses a stand-in: SyncBatchNorm itself runs only on GPUs (and like devices)."""
    assert saved["sync_batchnorm_on_cpu"]["error"].startswith("SyncBatchNorm expected input tensor to be on GPU")


def test_convert_sync_batchnorm_converts_every_projection_batchnorm_and_changes_nothing_else():
    config = dt.small_config()
    model = dt.make_model(config).eval()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(dt.make_model(config)).eval()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == 3 * sum(config.depth)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert converted.state_dict().keys() == model.state_dict().keys()  # checkpoints load either way
    pixels, _ = dt.make_batch((19, 23))
    with torch.no_grad():  # in eval mode BatchNorm is folded into the projections: the converted layers too
        assert torch.equal(converted(pixels).logits, model(pixels).logits)


def test_fsdp_on_cvt21s_structure_gives_the_ddp_gradients(saved):
    per_shard, _ = per_shard_reference(dt.narrow_cvt21_config(), (32, 32))
    assert_same(saved["fsdp"]["grads"], per_shard)


def test_torch_compile_under_ddp_gives_the_eager_gradients(saved):
    per_shard, _ = per_shard_reference(dt.small_config(), (19, 23))
    assert_same(saved["compiled_ddp"]["grads"], per_shard)


@pytest.mark.gpu
def test_nccl_ddp_and_sync_batchnorm_on_two_gpus(tmp_path):
    """The same on GPUs with nccl and PyTorch's own SyncBatchNorm (needs 2 GPUs)."""
    if torch.cuda.device_count() < WORLD_SIZE:
        pytest.skip(f"needs {WORLD_SIZE} GPUs")
    run_scenarios(tmp_path, "--cuda")
    saved = {path.stem: torch.load(path) for path in tmp_path.glob("*.pt")}
    per_shard, _ = per_shard_reference(dt.small_config(), (19, 23))
    assert_same(saved["ddp"]["grads"], per_shard, tolerance=1e-8)  # another device's float64 arithmetic
    whole, whole_statistics = whole_batch_reference(dt.small_config(), (19, 23))
    assert_same(saved["global_batchnorm"]["grads"], whole, tolerance=1e-8)
    assert_same(saved["global_batchnorm"]["stats"], whole_statistics, tolerance=1e-8)
