"""cvt_fast: a drop-in CvT for transformers checkpoints, with fused Triton kernels on the hot path.

from cvt_fast import CvtForImageClassification
model = CvtForImageClassification.from_pretrained("path/to/checkpoint")   # or a hub id

The names below are imported on first use, so that `import cvt_fast.cli` (and `cvt-fast --help`) does not pay for
torch's import.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "PRESETS": ".config",
    "ConfigError": ".errors",
    "CvtConfig": ".config",
    "preset": ".config",
    "KernelUnavailableError": ".errors",
    "CheckpointError": ".errors",
    "CheckpointNotFoundError": ".errors",
    "CheckpointWriteError": ".errors",
    "InputError": ".errors",
    "UserError": ".errors",
    "CvtBackbone": ".backbone",
    "BackboneOutput": ".outputs",
    "CvtForImageClassification": ".modeling",
    "CvtModel": ".modeling",
    "CvtPreTrainedModel": ".modeling",
    "kernel_paths": ".modeling",
    "BaseModelOutputWithCLSToken": ".outputs",
    "ImageClassifierOutputWithNoAttention": ".outputs",
    "from_transformers": ".patching",
    "freeze": ".frozen",
    "FreezeError": ".frozen",
    "FrozenCvt": ".frozen",
    "load_frozen": ".frozen",
    "PackageMismatchError": ".frozen",
    "patch": ".patching",
    "unpatch": ".patching",
}

__all__ = sorted(_EXPORTS)  # the names above, and only those (the TYPE_CHECKING imports below repeat them for
# type checkers and editors, which cannot follow __getattr__; a test holds the two to the same names)


# Modules reachable as attributes (`cvt_fast.ops.fold_conv_bn(...)` without importing cvt_fast.ops first): every
# module of this folder, and the kernels, which ship as cvt_fast.kernels from a folder of their own.
_SUBMODULES = frozenset(module.name for module in pkgutil.iter_modules(__path__)) - {"__main__"} | {"kernels"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cvt_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # the same names, imported eagerly, for type checkers and editors
    from .backbone import CvtBackbone
    from .config import PRESETS, CvtConfig, preset
    from .errors import (
        CheckpointError,
        CheckpointNotFoundError,
        CheckpointWriteError,
        ConfigError,
        InputError,
        KernelUnavailableError,
        UserError,
    )
    from .frozen import FreezeError, FrozenCvt, PackageMismatchError, freeze, load_frozen
    from .modeling import CvtForImageClassification, CvtModel, CvtPreTrainedModel, kernel_paths
    from .outputs import BackboneOutput, BaseModelOutputWithCLSToken, ImageClassifierOutputWithNoAttention
    from .patching import from_transformers, patch, unpatch
