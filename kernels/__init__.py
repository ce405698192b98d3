"""Triton kernels of cvt_fast, shipped as cvt_fast.kernels. One file per fused op; see each module's docstring."""

from .attention import flash_attention
from .conv_projection import qkv_conv_bn

__all__ = ["flash_attention", "qkv_conv_bn"]
