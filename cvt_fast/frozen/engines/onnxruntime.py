"""ONNX Runtime: cvt_fast's float32 ONNX graph (what `cvt-fast export` writes: each attention one
com.microsoft.MultiHeadAttention node, BatchNorm folded into its convolution, GELU one node) in an InferenceSession
on the CPU provider, with its graph optimisations and its default thread pool (whose threads spin briefly after a
run: measured faster at batch 1 than without). Any batch up to the package's runs as it is.
float32 only: the CPU provider has no bfloat16 kernels for this graph."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch

from ...cpu_target import CpuTarget
from ..record import FrozenInfo

NAME = "onnxruntime"
INSTALL = "pip install onnx onnxscript 'onnxruntime>=1.22' (the onnx extra)"
ARTIFACT = "model.onnx"
FILES = (ARTIFACT,)
ALWAYS_DYNAMIC_BATCH = True  # the graph's batch dimension is symbolic


def version() -> str | None:
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return None


def missing() -> str | None:
    """What freezing on it needs and this Python lacks (the export needs onnx and onnxscript; loading, onnxruntime)."""
    absent = [name for name in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    return f"{', '.join(absent)} not installed ({INSTALL})" if absent else None


def refuses(dtype: torch.dtype, here: CpuTarget) -> str | None:
    if dtype != torch.float32:
        return f"{str(dtype).removeprefix('torch.')}: ONNX Runtime's CPU provider runs this graph in float32 only"
    return None


def cannot_run(info: FrozenInfo, here: CpuTarget) -> str | None:
    return None  # an ONNX graph, not native code: ONNX Runtime compiles nothing ahead for a CPU


def build(graphs, info: FrozenInfo, folder: Path) -> dict[str, Path]:
    graphs.write_onnx(folder / ARTIFACT)
    return {ARTIFACT: folder / ARTIFACT}


def session(path: Path):
    """An InferenceSession on the CPU provider with torch's thread count and ONNX Runtime's own defaults otherwise
    (graph optimisations on; threads that spin briefly after a run, which measured faster at batch 1)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load(files: dict[str, Path], info: FrozenInfo):
    inference = session(files[ARTIFACT])
    names = [output.name for output in inference.get_outputs()]

    def run(pixel_values: torch.Tensor) -> list[torch.Tensor]:
        outputs = inference.run(names, {"pixel_values": pixel_values.numpy()})
        return [torch.from_numpy(output) for output in outputs]

    return run
