"""The graphs a freeze traces from its snapshot, each made at most once and shared by every engine that takes it:

  program()     torch.export of the eager path in the frozen dtype, attention as scaled_dot_product_attention, the
                shape fixed (or the batch bounded, with dynamic_batch): what inductor compiles
  write_onnx()  cvt_fast's float32 ONNX graph, as `cvt-fast export` makes it (each attention one fused node, the
                batch dimension symbolic): what ONNX Runtime runs and OpenVINO converts; exported once, copied after

Two traces rather than one: inductor cannot compile the attention op that the ONNX graph needs whole, and
decomposing that op out of one shared trace took longer than tracing again (measured on cvt-13).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

ONNX_FILE = "cvt_fast.onnx"


class Outputs(nn.Module):
    """What an engine computes: the model's output tensors, as a tuple, from pixel_values."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values, return_dict=True)
        return tuple(getattr(outputs, name) for name in self.names)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.export and AOTInductor warn of PyTorch's own deprecations (pytree's LeafSpec); none is about the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


class Graphs:
    """The traces of one freeze (see the module). `model`: the model as the caller holds it (the float32 graph is
    made from a float32 copy of it, so that a bfloat16 freeze's graph keeps the weights unrounded); `snapshot`: a
    copy in the frozen dtype on the eager path; `example`: pixel_values of the frozen shape and dtype; `scratch`: a
    folder for the ONNX file."""

    def __init__(self, model: nn.Module, snapshot: nn.Module, names: list[str], example: torch.Tensor,
                 dynamic_batch: bool, scratch: Path):  # fmt: skip
        self.model = model
        self.snapshot = snapshot
        self.names = names
        self.example = example
        self.dynamic_batch = dynamic_batch
        self._scratch = scratch
        self._onnx: Path | None = None

    def program(self) -> torch.export.ExportedProgram:
        dynamic = None
        if self.dynamic_batch:
            dynamic = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=len(self.example))}}
        with torch.no_grad(), quiet():
            return torch.export.export(Outputs(self.snapshot, self.names).eval(), (self.example,),
                                       dynamic_shapes=dynamic)  # fmt: skip

    def write_onnx(self, path: Path) -> None:
        if self._onnx is None:
            self._onnx = self._export_onnx()
        shutil.copyfile(self._onnx, path)

    def _export_onnx(self) -> Path:
        import onnx

        from ..export import onnx_model

        model = self.snapshot if self.snapshot.dtype == torch.float32 else copy.deepcopy(self.model).float().eval()
        model.set_backend("eager")
        config = model.config
        _, channels, height, width = self.example.shape
        # An example of two images: torch.export would take a batch of one for a constant.
        example = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
        batch = torch.export.Dim("batch", min=1, max=4096)
        proto, _ = onnx_model(Outputs(model, self.names).eval(), example, self.names, {"pixel_values": {0: batch}},
                              sum(config.depth[: config.num_stages]))  # fmt: skip
        path = self._scratch / ONNX_FILE
        onnx.save(proto, str(path))
        return path
