"""The operations of a CvT attention layer that cvt_fast computes its own way, each in one file with its custom op,
its eager reference and the choice of path; the choice itself is taken in one place.

  dispatch.py        backends, and each layer's KernelRoute: kernel or eager, with the reason, decided once
  qkv_projection.py  depthwise conv + BatchNorm for q, k and v in one pass
  attention.py       attention with shorter keys and values, the cls token and CvT's scale
  cpu_linear.py      linear layers on oneDNN where this CPU supports it
  layout.py          token layout, grids and heads, as views
"""

from ..kernels.shapes import conv_output_size
from .attention import attention, attention_as_one_op, attention_reference, attention_route
from .cpu_linear import LinearRoute, cpu_has_native_bfloat16, linear
from .dispatch import KernelRoute
from .layout import grid_to_tokens, split_cls, split_heads, tokens_to_grid
from .qkv_projection import (
    ConvBN,
    QkvOperands,
    fold_conv_bn,
    qkv_operands,
    qkv_projection,
    qkv_projection_reference,
    qkv_projection_route,
)

__all__ = [
    "ConvBN",
    "KernelRoute",
    "LinearRoute",
    "QkvOperands",
    "attention",
    "attention_as_one_op",
    "attention_reference",
    "attention_route",
    "conv_output_size",
    "cpu_has_native_bfloat16",
    "fold_conv_bn",
    "grid_to_tokens",
    "linear",
    "qkv_operands",
    "qkv_projection",
    "qkv_projection_reference",
    "qkv_projection_route",
    "split_cls",
    "split_heads",
    "tokens_to_grid",
]
