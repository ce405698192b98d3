"""The tools around the model, apart from it: what measures it against transformers and the engines, and what runs
it over folders of images. Nothing in the model's own modules imports from here.

  contenders.py         the benchmarks' contenders by name, and the defaults per device
  models.py             the models they measure: random weights the same on every machine, transformers' twin
  reporting.py          what the benchmarks share: dtypes, the machine's description, records, tables
  engines.py            ONNX Runtime (on either export), OpenVINO and the frozen path as contenders, built once
  benchmark.py          throughput and errors against transformers (cvt-fast bench)
  training_benchmark.py a fine-tuning step against transformers' (cvt-fast bench --train)
  resolution.py         memory and time against image size (cvt-fast bench --resolutions)
  dataset_inference/    a folder or list of images into a results file (cvt-fast classify --input)
  evaluation.py         a results file of a labelled folder scored: top-1, top-5, per class (cvt-fast evaluate)
"""

import importlib
import pkgutil
from typing import Any

# Every module of this package, read from its folder so that none is left out.
_MODULES = frozenset(module.name for module in pkgutil.iter_modules(__path__))


def __getattr__(name: str) -> Any:  # `cvt_fast.tools.reporting` without importing it first, as for cvt_fast itself
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'cvt_fast.tools' has no attribute {name!r}")
