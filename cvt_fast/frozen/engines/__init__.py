"""The engines a frozen CvT runs on, one module each, all with the same face:

  inductor.py     AOTInductor: native code compiled for this CPU class and this torch (.pt2); needs only torch
  onnxruntime.py  ONNX Runtime on cvt_fast's float32 ONNX graph
  openvino.py     OpenVINO on the same graph, converted to its IR; float32, or bfloat16 where the CPU has it

  NAME, INSTALL          the engine's name, and how to install it
  version()              its installed version, or None; read from the package metadata, without importing it
  missing()              what freezing on it needs and this Python lacks (a pip command), or None
  refuses(dtype, here)   why it cannot freeze this dtype on this CPU, or None
  cannot_run(info, here) why a package it made cannot run on this CPU, or None; asked before any of it loads
  FILES                  the names of its artifact's files, as a .cvt package holds them
  build(graphs, info, folder)
                         its artifact, written into folder from the shared traces (cvt_fast.frozen.graph): {name: file}
  load(files, info)      the artifact ready to run: pixel_values (in the frozen dtype) -> list of output tensors

The engine libraries are optional extras: nothing here imports one until an engine builds or loads.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("inductor", "onnxruntime", "openvino")


def engine(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown engine {name!r}; expected one of {NAMES}")
    return importlib.import_module(f".{name}", __name__)
