"""Shape arithmetic shared by the kernels and the code that plans their outputs (it imports nothing)."""


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output pixels of a convolution along one side."""
    return (size + 2 * padding - kernel) // stride + 1
