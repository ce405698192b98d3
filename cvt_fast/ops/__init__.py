"""The operations of a CvT attention layer that cvt_fast computes its own way, and the choice between a Triton
kernel and the eager path for each call.

  layout.py      token layout, grids and heads, as views
  references.py  the eager references of the two fused ops (CPU path, fallback, test oracle)
  custom_ops.py  the fused ops as torch custom ops: reference on the CPU, kernel on CUDA
  dispatch.py    the single decision point: backend, kernel or eager, and the logged reason
  fused.py       the fused ops as the model calls them (qkv_projection, attention)
  cpu.py         linear layers on oneDNN where this CPU supports it
"""

from ..kernels.shapes import conv_output_size
from .cpu import cpu_has_native_bfloat16, linear, linear_path
from .custom_ops import flatten_conv_bn, unflatten_conv_bn
from .fused import attention, attention_as_one_op, qkv_projection
from .layout import grid_to_tokens, split_cls, split_heads, tokens_to_grid
from .references import ConvBN, attention_reference, fold_conv_bn, qkv_projection_reference

__all__ = [
    "ConvBN",
    "attention",
    "attention_as_one_op",
    "attention_reference",
    "conv_output_size",
    "cpu_has_native_bfloat16",
    "flatten_conv_bn",
    "fold_conv_bn",
    "grid_to_tokens",
    "linear",
    "linear_path",
    "qkv_projection",
    "qkv_projection_reference",
    "split_cls",
    "split_heads",
    "tokens_to_grid",
    "unflatten_conv_bn",
]
