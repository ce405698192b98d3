"""OpenVINO: cvt_fast's float32 ONNX graph converted to OpenVINO's model (each attention one
ScaledDotProductAttention, BatchNorm folded, GELU one node), its batch bounded by the package's, saved as OpenVINO
IR with float32 weights, and compiled at load for this CPU with the precision given: "f32", or "bf16" (OpenVINO's own
bfloat16 inference over float32 weights) where the CPU computes bfloat16 natively. The precision is always given:
left to itself, OpenVINO runs bfloat16 on a CPU that has it even when float32 was meant. It runs with the latency
hint, or with the batch split across streams of one thread each, whichever freezing measured faster
(settings_to_try; the package records which).

Compiled for one static batch size at a time: the package's at load, a smaller one on its first call (about half a
second for cvt-13 on 2 cores), since OpenVINO ran cvt-13 9% to 18% slower compiled for a range of batch sizes
(bench/results/NOTES.md). Any batch up to the package's therefore runs as it is, never padded."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

from ...cpu_target import CpuTarget
from ..record import FrozenInfo

NAME = "openvino"
INSTALL = "pip install openvino onnx onnxscript (the openvino extra)"
ARTIFACT = "model.xml"  # and model.bin beside it
WEIGHTS = "model.bin"
FILES = (ARTIFACT, WEIGHTS)
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")  # the CPU flags OpenVINO's bfloat16 kernels need
# OpenVINO's CPU plugin reads oneDNN's ISA cap too: under a cap of AVX2 or below on an AVX-512 CPU, OpenVINO 2026.4.1
# died of a segmentation fault running cvt-13 in float32 (and refused bfloat16's Softmax), where no Python can catch
# it. So under such a cap it is not used; under a cap without AVX-512 BF16, not in bfloat16.
ISA_CAP_VAR = "ONEDNN_MAX_CPU_ISA"
CAPS_WITHOUT_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
CAPS_WITHOUT_BFLOAT16 = (*CAPS_WITHOUT_AVX512, "AVX512_CORE", "AVX512_CORE_VNNI")
ALWAYS_DYNAMIC_BATCH = True  # each batch size compiled on its first call


def version() -> str | None:
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None


def missing() -> str | None:
    """What freezing on it needs and this Python lacks (the graph comes from cvt_fast's ONNX export)."""
    absent = [name for name in ("openvino", "onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    return f"{', '.join(absent)} not installed ({INSTALL})" if absent else None


def refuses(dtype: torch.dtype, here: CpuTarget) -> str | None:
    return cannot_compute(dtype, here)


def cannot_run(info: FrozenInfo, here: CpuTarget) -> str | None:
    return cannot_compute(info.dtype, here)


def cannot_compute(dtype: torch.dtype, here: CpuTarget) -> str | None:
    """Why OpenVINO cannot run this dtype in this process on this CPU (see ISA_CAP_VAR), or None."""
    cap = os.environ.get(ISA_CAP_VAR, "").strip().upper()
    if cap in CAPS_WITHOUT_AVX512 and "avx512f" in here.flags:
        return (f"{ISA_CAP_VAR}={cap} on a CPU with AVX-512: OpenVINO crashed under such a cap (a segmentation "
                "fault, OpenVINO 2026.4.1), so it is not used")  # fmt: skip
    if dtype == torch.bfloat16 and not any(flag in here.flags for flag in NATIVE_BFLOAT16_FLAGS):
        return "OpenVINO computes bfloat16 only on a CPU with AVX-512 BF16 or AMX, and would run float32 here"
    if dtype == torch.bfloat16 and cap in CAPS_WITHOUT_BFLOAT16:
        return f"OpenVINO's bfloat16 needs AVX-512 BF16 or AMX, which {ISA_CAP_VAR}={cap} keeps from it"
    return None


def build(graphs, info: FrozenInfo, folder: Path) -> dict[str, Path]:
    import openvino

    onnx_file = folder / "graph.onnx"
    graphs.write_onnx(onnx_file)
    model = openvino.convert_model(str(onnx_file))
    onnx_file.unlink()
    batch, channels, height, width = info.input_shape
    model.reshape({model.inputs[0]: [openvino.Dimension(1, batch), channels, height, width]})
    for output, name in zip(model.outputs, info.outputs, strict=True):
        output.get_tensor().set_names({name})
    openvino.save_model(model, str(folder / ARTIFACT), compress_to_fp16=False)  # float32 weights, as validated
    return {ARTIFACT: folder / ARTIFACT, WEIGHTS: folder / WEIGHTS}


def settings_to_try(info: FrozenInfo) -> list[dict]:
    """The ways to run it that freezing times against each other: one stream on all of torch's threads (the latency
    hint); and, for batches of two or more, the batch split across streams of one thread each (OpenVINO's
    throughput mode), which keeps each thread on its own images instead of meeting the others at every operation."""
    threads, batch = torch.get_num_threads(), info.input_shape[0]
    return [{}] + ([{"streams": min(threads, batch)}] if threads >= 2 and batch >= 2 else [])


def describe_settings(settings: dict) -> str:
    streams = settings.get("streams", 1)
    return f"{streams} streams of {max(1, torch.get_num_threads() // streams)} thread(s)" if streams > 1 else ""


def load(files: dict[str, Path], info: FrozenInfo):
    import openvino

    return _Runner(openvino.Core(), str(files[ARTIFACT]), str(files[WEIGHTS]), info)


class _Runner:
    """The model compiled for one static batch size at a time (see the module): pixel_values -> list of outputs. With
    streams, a batch of at least as many images is split into that many equal chunks (the last padded), run at once."""

    def __init__(self, core, model_file: str, weights_file: str, info: FrozenInfo):
        self._core = core
        self._model = core.read_model(model_file, weights_file)
        self._info = info
        self._streams = info.settings.get("streams", 1)
        self._compiled: dict[int, tuple] = {}  # batch size -> (compiled model, infer requests, images per request)
        self._compiled_for(info.input_shape[0])

    def _compiled_for(self, batch: int) -> tuple:
        if batch not in self._compiled:
            streams = self._streams if batch >= self._streams else 1
            chunk = -(-batch // streams)
            config = {
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "INFERENCE_PRECISION_HINT": "bf16" if self._info.dtype == torch.bfloat16 else "f32",
            }
            config.update({"NUM_STREAMS": streams} if streams > 1 else {"PERFORMANCE_HINT": "LATENCY"})
            fixed = self._model.clone()
            fixed.reshape({fixed.inputs[0]: [chunk, *self._info.input_shape[1:]]})
            compiled = self._core.compile_model(fixed, "CPU", config)
            self._compiled[batch] = compiled, [compiled.create_infer_request() for _ in range(streams)], chunk
        return self._compiled[batch]

    def __call__(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        count = len(pixel_values)
        compiled, requests, chunk = self._compiled_for(count)
        x = pixel_values.float()
        if len(requests) == 1:
            results = [requests[0].infer({0: x.numpy()})]
        else:
            padded = torch.cat((x, x.new_zeros(chunk * len(requests) - count, *x.shape[1:])))
            for request, part in zip(requests, padded.split(chunk), strict=True):
                request.start_async({0: part.numpy()})
            for request in requests:
                request.wait()
            results = [request.results for request in requests]
        dtype = self._info.dtype
        return [
            torch.cat([torch.from_numpy(result[output].copy()) for result in results])[:count].to(dtype)
            for output in compiled.outputs
        ]
