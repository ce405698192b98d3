"""cvt_fast: a drop-in CvT for transformers checkpoints, with fused Triton kernels on the hot path.

from cvt_fast import CvtForImageClassification
model = CvtForImageClassification.from_pretrained("path/to/checkpoint")   # or a hub id
"""

from .config import PRESETS, CvtConfig, preset
from .dispatch import KernelUnavailableError
from .loading import CheckpointError
from .modeling import CvtForImageClassification, CvtModel, CvtPreTrainedModel, kernel_paths
from .outputs import BaseModelOutputWithCLSToken, ImageClassifierOutputWithNoAttention
from .patching import from_transformers, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BaseModelOutputWithCLSToken",
    "CheckpointError",
    "CvtConfig",
    "CvtForImageClassification",
    "CvtModel",
    "CvtPreTrainedModel",
    "ImageClassifierOutputWithNoAttention",
    "KernelUnavailableError",
    "from_transformers",
    "kernel_paths",
    "patch",
    "preset",
    "unpatch",
]
