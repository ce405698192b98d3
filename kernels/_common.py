"""What the kernel launchers share."""

import os


def interpreter_active() -> bool:
    """Triton's interpreter runs kernels on CPU tensors, one program at a time (TRITON_INTERPRET=1, read by Triton
    when first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
