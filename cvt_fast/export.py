"""ONNX export: a CvT through the eager path, with dynamic batch, height and width, validated by ONNX Runtime.

The model is traced (torch.export, then torch.onnx's translator) in float32, eval mode, on the eager path: the
Triton kernels never reach the graph. Each attention is traced as one op (torch.ops.cvt_fast.attention, whose CPU
implementation is the eager reference) and mapped whole onto a fused attention node, never onto a materialised
score matrix:

  attention="ort"   com.microsoft.MultiHeadAttention, ONNX Runtime's fused attention, whose CPU kernel is
                    flash-style (a 768 px CvT-13's first stage needs no 1.3 GB score matrix). The default.
  attention="onnx"  the standard ONNX Attention op (opset 23), for other runtimes; ONNX Runtime 1.32's CPU kernel
                    for it does materialise the scores.

Opset 23 (ONNX Runtime 1.22 or newer). The written file is checked before it replaces anything at the output
path: ONNX Runtime runs it on random images of several sizes and batch sizes, and its outputs must be within 1e-4
(relative to the largest magnitude) of cvt_fast's float32 eager path; otherwise nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import ops
from .errors import MissingDependencyError
from .testing import relative_error

OPSET = 23
ATTENTION_FORMS = {
    "ort": ("com.microsoft", "MultiHeadAttention"),
    "onnx": ("", "Attention"),
}
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export could not be made, or made a file that does not compute what the model computes."""


@dataclass
class ExportReport:
    path: Path
    attention: str  # the attention nodes in the graph, e.g. "com.microsoft.MultiHeadAttention x 13"
    output_name: str
    validation: list[tuple[tuple[int, ...], float]] = field(default_factory=list)  # (input shape, max rel err)

    @property
    def max_rel_err(self) -> float | None:
        return max((err for _, err in self.validation), default=None)


def require(*names: str) -> None:
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"ONNX export needs {', '.join(missing)}: pip install onnx onnxscript 'onnxruntime>=1.22' (the onnx extra)"
        )


class _Traced(nn.Module):
    """What the exported graph returns: a classifier's logits, a base model's last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.output_name = "logits" if hasattr(model, "classifier") else "last_hidden_state"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values, return_dict=True), self.output_name)


@contextlib.contextmanager
def _exporter_quiet():
    """The exporter prints its progress, warns that torchvision's ops cannot be registered, and PyTorch's pytree
    warns of its own deprecations: none of it is about this model. The report says what matters."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _attention_translation(q, k, v, num_heads: int, scale: float):
    """torch.ops.cvt_fast.attention, (B, N, C) in and out, as ONNX's Attention on 3-D inputs."""
    from onnxscript import opset23

    outputs = opset23.Attention(q, k, v, q_num_heads=num_heads, kv_num_heads=num_heads, scale=scale)
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _to_multi_head_attention(model_proto) -> None:
    """Every ONNX Attention node (3-D inputs, as _attention_translation makes them) becomes ONNX Runtime's
    com.microsoft.MultiHeadAttention, which takes the same (B, N, C) query, key and value."""
    from onnx import helper

    graph = model_proto.graph
    for index, node in enumerate(graph.node):
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            replacement = helper.make_node(
                "MultiHeadAttention", list(node.input[:3]), [node.output[0]], name=node.name,
                domain="com.microsoft", num_heads=attributes["q_num_heads"], scale=attributes["scale"],
            )  # fmt: skip
            graph.node.remove(node)
            graph.node.insert(index, replacement)
    if not any(o.domain == "com.microsoft" for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _attention_summary(model_proto, form: str, layers: int) -> str:
    """Name the attention nodes, and refuse a graph that attends any other way (a Softmax is a score matrix)."""
    domain, op_type = ATTENTION_FORMS[form]
    found = sum(1 for n in model_proto.graph.node if (n.domain or "") == domain and n.op_type == op_type)
    strays = sorted({f"{n.domain}.{n.op_type}" for n in model_proto.graph.node if n.op_type == "Softmax" or
                     n.domain not in ("", "ai.onnx", "com.microsoft")})  # fmt: skip
    if found != layers or strays:
        raise ExportError(
            f"the exported graph has {found} {domain or 'onnx'}.{op_type} nodes for {layers} attention layers"
            + (f" and unexpected {', '.join(strays)}" if strays else "")
        )
    return f"{(domain + '.') if domain else 'ONNX '}{op_type} x {found}"


def _validation_inputs(num_channels: int, sizes) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, num_channels, h, w, generator=generator) for batch, h, w in sizes]


def _validate(path: Path, traced: _Traced, inputs: list[torch.Tensor]) -> list[tuple[tuple[int, ...], float]]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = []
    with torch.inference_mode():
        for x in inputs:
            expected = traced(x).double()
            actual = torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0]).double()
            if actual.shape != expected.shape:
                raise ExportError(f"ONNX Runtime returned {tuple(actual.shape)} for {tuple(x.shape)}, expected "
                                  f"{tuple(expected.shape)}")  # fmt: skip
            results.append((tuple(x.shape), relative_error(actual, expected)))
    return results


def load_for_export(name_or_path: str | os.PathLike) -> nn.Module:
    """A checkpoint as the model it holds: CvtForImageClassification when it has a classifier head, else CvtModel
    (the keys are read from the safetensors header alone where there is one)."""
    from .hub import resolve_checkpoint_dir
    from .loading import read_state_dict, weight_files
    from .modeling import CvtForImageClassification, CvtModel

    directory = resolve_checkpoint_dir(name_or_path)
    keys: set[str] = set()
    for file in weight_files(directory):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                keys.update(handle.keys())
        else:
            keys.update(read_state_dict([file]))
    has_head = any(key.startswith(("classifier.", "layernorm.")) for key in keys)
    return (CvtForImageClassification if has_head else CvtModel).from_pretrained(directory, backend="eager")


def onnx_model(module: nn.Module, example: torch.Tensor, output_names: list[str], dynamic_shapes: dict,
               layers: int, attention: str = "ort"):  # fmt: skip
    """(onnx.ModelProto, a summary of its attention nodes) of `module` (a cvt_fast model wrapped to return a tensor or
    a tuple of them, on the eager path, float32, eval mode) traced on `example` with the attention as one op, mapped
    onto `attention`'s fused node (ATTENTION_FORMS). ExportError unless the graph has one such node per attention
    layer and no score matrix."""
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention is {attention!r}; expected one of {tuple(ATTENTION_FORMS)}")
    with ops.attention_as_one_op(), torch.no_grad(), _exporter_quiet():
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=OPSET, input_names=["pixel_values"],
            output_names=output_names, dynamic_shapes=dynamic_shapes,
            custom_translation_table={torch.ops.cvt_fast.attention.default: _attention_translation},
        )  # fmt: skip
    model_proto = program.model_proto
    if attention == "ort":
        _to_multi_head_attention(model_proto)
    return model_proto, _attention_summary(model_proto, attention, layers)


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    attention: str = "ort",
    validate: bool = True,
    validation_sizes=((1, 224, 224), (2, 192, 288)),
) -> ExportReport:
    """Export a cvt_fast CvtForImageClassification (logits) or CvtModel (last_hidden_state) to ONNX at `output`.

    Dynamic batch, height and width. validation_sizes: (batch, height, width) of the random images ONNX Runtime
    checks the file on (at least two, so that one file is seen to take several shapes)."""
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention is {attention!r}; expected one of {tuple(ATTENTION_FORMS)}")
    require("onnx", "onnxscript", *(["onnxruntime"] if validate else []))
    import onnx

    output = Path(output)
    if not output.parent.is_dir():
        raise ExportError(f"{output.parent} is not a folder to write {output.name} in")
    model = copy.deepcopy(model).float().eval()  # the caller's model keeps its dtype, device and backend
    model = model.cpu()
    model.set_backend("eager")
    traced = _Traced(model).eval()
    config = model.config
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=config.total_stride, max=16384)
    width = torch.export.Dim("width", min=config.total_stride, max=16384)
    example = _validation_inputs(config.num_channels, [(2, 224, 224)])[0]
    model_proto, summary = onnx_model(
        traced, example, [traced.output_name], {"pixel_values": {0: batch, 2: height, 3: width}},
        sum(config.depth[: config.num_stages]), attention,
    )  # fmt: skip
    report = ExportReport(output, summary, traced.output_name)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        onnx.save(model_proto, str(temporary))
        if validate:
            report.validation = _validate(temporary, traced, _validation_inputs(config.num_channels, validation_sizes))
            if report.max_rel_err > TOLERANCE:
                raise ExportError(
                    f"ONNX Runtime's output is {report.max_rel_err:.1e} from cvt_fast's (relative), over "
                    f"{TOLERANCE:.0e}: not written"
                )
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return report


__all__ = ["ExportError", "ExportReport", "MissingDependencyError", "export_onnx", "load_for_export", "onnx_model"]
