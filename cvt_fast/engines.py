"""The inference engines the benchmarks hold cvt_fast against on the CPU: ONNX Runtime on cvt_fast's ONNX export, and
OpenVINO on transformers' model with the same weights. Each uses as many threads as torch does, is built once per
model (Engines keeps what was built) and returns logits as a torch tensor."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import MissingDependencyError

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL = {
    "onnxruntime": "pip install onnx onnxscript 'onnxruntime>=1.22'",
    "openvino": "pip install openvino (in a clone: pip install -e '.[openvino]')",
}


def installed(engine: str) -> bool:
    packages = ONNX_PACKAGES if engine == "onnxruntime" else ("openvino", "transformers")
    return all(importlib.util.find_spec(name) is not None for name in packages)


def openvino_native_bfloat16() -> bool:
    """Whether OpenVINO's CPU plugin computes bfloat16 here (elsewhere it would quietly run float32)."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class Engines:
    """What each engine built, by model name: an ONNX Runtime session (its export has dynamic batch, height and
    width, so one serves every case of a model), an OpenVINO model (reshaped and compiled per case)."""

    def __init__(self):
        self._onnx_sessions: dict[str, object] = {}
        self._openvino_models: dict[str, object] = {}

    def onnxruntime(self, model_name: str, base) -> Callable[[torch.Tensor], torch.Tensor]:
        """ONNX Runtime (CPU provider, graph optimisations on) on cvt_fast's float32 export of `base`."""
        if not installed("onnxruntime"):
            raise MissingDependencyError(
                f"onnxruntime needs onnx, onnxscript and onnxruntime: {INSTALL['onnxruntime']}"
            )
        import onnxruntime

        from .export import export_onnx

        if model_name not in self._onnx_sessions:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            # Its threads would otherwise spin after each run, on the cores the next contender needs.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.onnx"
                export_onnx(base, path, validate=False)  # the benchmark measures the error itself
                self._onnx_sessions[model_name] = onnxruntime.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
        session = self._onnx_sessions[model_name]
        return lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.float().numpy()})[0])

    def openvino(
        self, model_name: str, transformers_model, x: torch.Tensor, dtype: torch.dtype
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """OpenVINO (CPU plugin, latency hint) on transformers' float32 model, its shape fixed to x's; bfloat16 through
        OpenVINO's inference precision (its autocast), only where the CPU computes it natively."""
        if not installed("openvino"):
            raise MissingDependencyError(f"openvino needs openvino and transformers: {INSTALL['openvino']}")
        import openvino

        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the OpenVINO contender runs float32 and bfloat16, not {dtype}")
        if model_name not in self._openvino_models:
            self._openvino_models[model_name] = openvino.convert_model(
                _Logits(transformers_model), example_input=x.float()
            )
        converted = self._openvino_models[model_name]
        converted.reshape({converted.inputs[0]: list(x.shape)})
        compiled = openvino.Core().compile_model(
            converted,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
                "PERFORMANCE_HINT": "LATENCY",
            },
        )
        request = compiled.create_infer_request()
        return lambda x: torch.from_numpy(request.infer({0: x.float().numpy()})[0].copy())


class _Logits(torch.nn.Module):
    """A transformers classifier as a module that returns its logits alone (what a converter can trace)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).logits
