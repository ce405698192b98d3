"""The engines the benchmarks run: ONNX Runtime on transformers' own export (as optimum makes it) and OpenVINO on
transformers' model with the same weights, the contenders without cvt_fast; cvt_fast's graph frozen on each engine
(cvt_fast.frozen), and ONNX Runtime on cvt_fast's dynamic-shape export (the resolution benchmark). Each uses as many
threads as torch does, is built once per model (Engines keeps what was built) and returns logits as a torch tensor."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import MissingDependencyError
from .contenders import FROZEN

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL = {
    "onnxruntime": "pip install onnx onnxscript 'onnxruntime>=1.22'",
    "onnxruntime-transformers": "pip install onnx onnxscript 'onnxruntime>=1.22' transformers",
    "openvino-transformers": "pip install openvino transformers (in a clone: pip install -e '.[openvino]')",
    "cvt_fast-frozen-onnxruntime": "pip install onnx onnxscript 'onnxruntime>=1.22' (in a clone: pip install -e "
    "'.[onnx]')",
    "cvt_fast-frozen-openvino": "pip install openvino onnx onnxscript (in a clone: pip install -e '.[openvino]')",
}
# transformers' model through torch.onnx's TorchScript exporter, which optimum's ONNX export drives: opset 17 has
# LayerNormalization as one node.
TRANSFORMERS_ONNX_OPSET = 17


def installed(engine: str) -> bool:
    """Whether a contender that needs more than torch (INSTALL's names) can run here."""
    needs = {
        "onnxruntime": ONNX_PACKAGES,
        "onnxruntime-transformers": (*ONNX_PACKAGES, "transformers"),
        "openvino-transformers": ("openvino", "transformers"),
        "cvt_fast-frozen-onnxruntime": ONNX_PACKAGES,
        "cvt_fast-frozen-openvino": ("openvino", "onnx", "onnxscript"),
    }[engine]
    return all(importlib.util.find_spec(name) is not None for name in needs)


def openvino_native_bfloat16() -> bool:
    """Whether OpenVINO's CPU plugin computes bfloat16 here (elsewhere it would quietly run float32)."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def onnxruntime_session(path: str | Path):
    """ONNX Runtime's CPU provider on `path`, configured as cvt_fast's frozen packages configure it (torch's thread
    count, ONNX Runtime's defaults otherwise), so that both exports run alike. Its threads spin briefly after a run;
    the interleaved timer does not count the first call after another contender's, which that spin could slow."""
    from ..frozen.engines.onnxruntime import session

    return session(Path(path))


def export_transformers_onnx(transformers_model: torch.nn.Module, path: Path, image_shape: tuple[int, ...]) -> None:
    """transformers' classifier as ONNX the way optimum users get it: torch.onnx.export's TorchScript exporter,
    float32, for (channels, height, width) `image_shape` and any batch (its attention stays MatMul + Softmax over the
    full score matrix)."""
    example = torch.randn(1, *image_shape)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            _Logits(transformers_model.float().eval()), (example,), str(path), dynamo=False,
            opset_version=TRANSFORMERS_ONNX_OPSET, input_names=["pixel_values"], output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip


class Engines:
    """What each built contender costs to make, made once and kept, by model name: ONNX Runtime sessions (the exports
    have a dynamic batch, so one serves every case of a model), OpenVINO models (reshaped and compiled per case), and
    cvt_fast's graph frozen on every engine asked for at once (cvt_fast.frozen.freeze_each: one set of traces), per
    model, image size and dtype: for the batch when the run has one, else for any batch up to the run's largest, so
    that a run of several batches pays one build, not one per batch."""

    def __init__(self, batches: list[int] | None = None, frozen_engines: list[str] | None = None):
        self._onnx_sessions: dict[tuple, object] = {}
        self._openvino_models: dict[str, object] = {}
        self._frozen: dict[tuple, dict] = {}
        self._batches = sorted(set(batches or []))
        self._frozen_engines = list(frozen_engines or FROZEN.values())

    def frozen(self, model_name: str, base, x: torch.Tensor, engine: str):
        """cvt_fast.freeze of `base` on `engine` for x's image size and dtype (see the class); the reason, raised,
        where the engine could not freeze it."""
        from ..frozen import FrozenCvt, freeze_each

        several = len(self._batches) > 1 and x.shape[0] in self._batches
        batch_size = self._batches[-1] if several else x.shape[0]
        key = (model_name, tuple(x.shape[1:]), x.dtype, batch_size, several)
        if key not in self._frozen:  # every engine of the run at once (one that cannot take the dtype is skipped)
            self._frozen[key] = freeze_each(
                base, self._frozen_engines, batch_size=batch_size, image_size=tuple(x.shape[-2:]), dtype=x.dtype,
                dynamic_batch=several, autotune=False, processor=None,
            )  # fmt: skip
        result = self._frozen[key].get(engine)
        if not isinstance(result, FrozenCvt):
            raise RuntimeError(result.describe() if result is not None else f"{engine}: not built")
        return result

    def onnxruntime(self, model_name: str, base) -> Callable[[torch.Tensor], torch.Tensor]:
        """ONNX Runtime on cvt_fast's float32 export of `base` with dynamic batch, height and width (fused attention
        nodes): the resolution benchmark's."""
        from ..export import export_onnx

        def export(path: Path) -> None:
            export_onnx(base, path, validate=False)  # the benchmark measures the error itself

        return self._session(("cvt_fast", model_name), export)

    def onnxruntime_transformers(
        self, model_name: str, transformers_model, x: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """ONNX Runtime on transformers' own float32 export (export_transformers_onnx), for x's image size."""
        shape = tuple(x.shape[1:])
        return self._session(
            ("transformers", model_name, shape), lambda path: export_transformers_onnx(transformers_model, path, shape)
        )

    def _session(self, key: tuple, export: Callable[[Path], None]) -> Callable[[torch.Tensor], torch.Tensor]:
        if not installed("onnxruntime"):
            raise MissingDependencyError(
                f"onnxruntime needs onnx, onnxscript and onnxruntime: {INSTALL['onnxruntime']}"
            )
        if key not in self._onnx_sessions:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.onnx"
                export(path)
                self._onnx_sessions[key] = onnxruntime_session(path)
        session = self._onnx_sessions[key]
        return lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.float().numpy()})[0])

    def openvino_transformers(
        self, model_name: str, transformers_model, x: torch.Tensor, dtype: torch.dtype
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """OpenVINO (CPU plugin, latency hint) on transformers' float32 model, its shape fixed to x's; bfloat16 through
        OpenVINO's inference precision (its autocast), only where the CPU computes it natively. The precision is
        always given: left to itself, OpenVINO runs bfloat16 on a CPU that has it even when float32 was meant."""
        if not installed("openvino-transformers"):
            raise MissingDependencyError(f"needs openvino and transformers: {INSTALL['openvino-transformers']}")
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
