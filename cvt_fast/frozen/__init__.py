"""Frozen CPU inference: a CvT made ahead of time for one input shape and dtype on this CPU, on the engine this CPU
runs it fastest on, checked against float64, and kept as one package.

  freeze(model, batch_size=8, dtype="fastest")  ->  FrozenCvt on the fastest engine here (info.trials: every engine's
                                                    figures); engine="inductor" | "onnxruntime" | "openvino" for one
  frozen(pixel_values)                              the model's outputs
  frozen.save("cvt.cvt")  /  load_frozen(...)       the package (.cvt for any engine, .pt2 for inductor's alone), in
                                                    a new process, in seconds, without transformers

The engines (engines/): AOTInductor compiles the eager path into native code for this CPU (torch alone); ONNX Runtime
and OpenVINO run cvt_fast's ONNX graph (optional extras). The package records what it was made from and for
(record.py), and a process that cannot run it (a missing engine or another version of it, another torch for native
code, a CPU without the instructions it was built for) refuses it in one line before any of it loads (package.py).

  record.py     FrozenInfo, what a package records; Trial, what freezing measured of each engine
  graph.py      the traces every engine builds from, each made once per freeze
  engines/      one module per engine, all with the same face
  freezing.py   freeze, freeze_each, freeze_checkpoint: build, check, time, choose
  snapshot.py   FrozenCvt, the frozen model as it runs; load_frozen
  package.py    the package file: written in one step, its record read and judged before anything loads

A frozen model is a snapshot: the weights are constants of the engine's model, so edits to the model after freezing
(training, a LoRA merge, load_state_dict) do not reach it. That is why it is never what from_pretrained returns. It
runs on the CPU only: on a GPU, the Triton kernels under torch.compile or a CUDA graph are the fast path.
"""

from .freezing import ENGINE_CHOICES, FASTEST, FreezeError, freeze, freeze_checkpoint, freeze_each
from .package import PackageMismatchError, is_package, read_package_info
from .record import FrozenInfo, Trial
from .snapshot import FrozenCvt, load_frozen

__all__ = [
    "ENGINE_CHOICES",
    "FASTEST",
    "FreezeError",
    "FrozenCvt",
    "FrozenInfo",
    "PackageMismatchError",
    "Trial",
    "freeze",
    "freeze_checkpoint",
    "freeze_each",
    "is_package",
    "load_frozen",
    "read_package_info",
]
