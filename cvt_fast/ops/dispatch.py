"""The single decision point: for each fused op of each layer, a Triton kernel or the eager reference.

Backends:
  "eager"   never run a kernel.
  "auto"    run a kernel where one applies (CUDA tensors, eval mode, float32/float16/bfloat16, a covered shape);
            otherwise the eager path, and log the reason once.
  "triton"  run the kernels, also on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1). Where they
            cannot run at all (no Triton, another device, float64) it raises instead of falling back. What an op
            does not cover (a projection method, a head size) and training or autograd (the kernels have no
            backward) still take the eager path, as under "auto".

The backend comes from the constructor / from_pretrained argument, else the CVT_FAST_BACKEND variable, else "auto".

Decided once, not on every call: each layer holds a KernelRoute per fused op, built with the layer and again by
set_backend (which also rereads the environment variables below). Per call it looks only at what the call itself
can change: training mode, autograd, and the tensors' device and dtype, whose verdict it keeps after the first call.

float32 attention on the kernel path (CVT_FAST_FP32_ATTENTION, read when a layer is built or its backend set):
"tf32x3" (the default: the kernel, with three TF32 tensor-core products per dot for float32-level accuracy) or
"sdpa" (PyTorch's scaled_dot_product_attention, which also computes float32 attention on tensor cores). The GPU
sweep (bench/kernel_bench.py) measures both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

from ..errors import InputError, KernelUnavailableError
from ..kernels.launch import TRITON_INTERPRET

BACKENDS = ("auto", "eager", "triton")
ENV_VAR = "CVT_FAST_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_ATTENTION_VAR = "CVT_FAST_FP32_ATTENTION"
FP32_ATTENTION_MODES = ("tf32x3", "sdpa")

logger = logging.getLogger("cvt_fast")
_logged_reasons: set[str] = set()
_kernel_import_error: list[str | None] = []  # [] until checked, then [None] or [reason]


def resolve_backend(backend: str | None = None) -> str:
    chosen = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    chosen = chosen.strip().lower()
    if chosen not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {ENV_VAR}"
        raise InputError(f"{source} is {chosen!r}; expected one of {BACKENDS}")
    return chosen


def fp32_attention_mode() -> str:
    """How float32 attention runs on the kernel path, from CVT_FAST_FP32_ATTENTION."""
    mode = os.environ.get(FP32_ATTENTION_VAR, "tf32x3").strip().lower()
    if mode not in FP32_ATTENTION_MODES:
        raise InputError(
            f"environment variable {FP32_ATTENTION_VAR} is {mode!r}; expected one of {FP32_ATTENTION_MODES}"
        )
    return mode


def prepare_backend(backend: str) -> None:
    """Before any layer changes: refuse a bad CVT_FAST_FP32_ATTENTION (so a model is never left half switched), and
    import the kernels now, where they may run, rather than on a first forward inside a torch.compile trace."""
    if backend == "eager":
        return
    fp32_attention_mode()
    if torch.cuda.is_available() or TRITON_INTERPRET:
        kernels_import_error()


def kernels_import_error() -> str | None:
    """None when the kernels (and so Triton) import, else why they do not."""
    if not _kernel_import_error:
        try:
            from ..kernels import attention, conv_projection  # noqa: F401  (the launchers import Triton)

            _kernel_import_error.append(None)
        except ImportError as error:  # triton missing, or an install without the kernels package
            _kernel_import_error.append(f"the Triton kernels are unavailable ({error})")
    return _kernel_import_error[0]


def _environment_reason(device: torch.device, dtype: torch.dtype, backend: str) -> str | None:
    """Why the kernels cannot run on tensors of this device and dtype at all, or None."""
    if device.type == "cpu":
        if not TRITON_INTERPRET and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return (
                "CPU tensors: TRITON_INTERPRET=1 was set after cvt_fast was imported; it must be set before "
                "importing cvt_fast (and triton) for the kernels to run in the interpreter"
            )
        if not TRITON_INTERPRET:
            return "CPU tensors: the kernels run on CUDA (or on CPU under TRITON_INTERPRET=1 with backend='triton')"
        if backend == "auto":
            return "CPU tensors: 'auto' runs kernels on CUDA only; backend='triton' runs them in the Triton interpreter"
    elif device.type != "cuda":
        return f"{device.type} tensors: the kernels run on CUDA"
    import_error = kernels_import_error()
    if import_error:
        return import_error
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype}: the kernels take float32, float16 and bfloat16"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 on CPU: the Triton interpreter has no bfloat16 arithmetic"
    return None


TRAINING = "training mode: the kernels have no backward and BatchNorm uses batch statistics"
AUTOGRAD = "autograd is recording (no backward in the kernels); run inference under torch.inference_mode()"
KERNEL = "triton"  # the path name of a kernel run; an eager run is named "eager: <reason>"


class KernelRoute:
    """Whether one fused op of one layer runs its Triton kernel, and if not, why.

    `uncovered(dtype)` is the op's own reason not to cover this layer in that dtype (a projection method, a head
    size), or None; it is asked once per device and dtype, as is the environment, and both verdicts are kept.
    `taken` is the path of the last call: "triton" or "eager: <reason>" (kernel_paths() shows it).
    """

    def __init__(self, op: str, backend: str, uncovered: Callable[[torch.dtype], str | None] | None = None):
        # `uncovered` must pickle with the model (torch.save(model), a spawned worker): a module-level function or
        # a functools.partial of one, never a lambda or a closure.
        self.op, self.backend, self._uncovered = op, backend, uncovered
        self._verdicts: dict[tuple[torch.device, torch.dtype], str | None] = {}
        self.taken: str | None = None

    def __getstate__(self) -> dict:
        # The verdicts judged this process's environment (Triton, the GPU); an unpickled model judges its own.
        return {**self.__dict__, "_verdicts": {}, "taken": None}

    def reason(self, tensors: Sequence[torch.Tensor], training: bool) -> str | None:
        """None to run the kernel on `tensors` (the op's inputs, weights included), else why the eager path runs."""
        if self.backend == "eager":
            reason = "backend='eager'"
        elif training:
            reason = _fall_back(self.op, TRAINING)
        elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            reason = _fall_back(self.op, AUTOGRAD)
        else:
            key = (tensors[0].device, tensors[0].dtype)
            if key in self._verdicts:
                reason = self._verdicts[key]
            else:
                reason = self._decide(*key)
                if not torch.compiler.is_compiling():  # a trace replays what it sees; it does not keep state
                    self._verdicts[key] = reason
        if not torch.compiler.is_compiling():
            self.taken = KERNEL if reason is None else f"eager: {reason}"
        return reason

    def _decide(self, device: torch.device, dtype: torch.dtype) -> str | None:
        reason = _environment_reason(device, dtype, self.backend)
        if reason is not None and self.backend == "triton":
            raise KernelUnavailableError(
                f"backend='triton' cannot run {self.op}: {reason}. Use backend='auto' (--backend auto) to fall back."
            )
        if reason is None and self._uncovered is not None:  # what the op does not cover runs eagerly either way
            reason = self._uncovered(dtype)
        if reason is None:
            return None
        return _fall_back(self.op, reason, surprising=device.type == "cuda")


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log a fallback's reason the first time it happens, not on every call."""
    if message not in _logged_reasons and not torch.compiler.is_compiling():
        _logged_reasons.add(message)
        logger.log(level, "cvt_fast: %s", message)


def _fall_back(op: str, reason: str, surprising: bool = False) -> str:
    # On CUDA a fallback costs speed the user came for, so it is a warning; elsewhere it is expected.
    log_once(f"{op} runs eagerly: {reason}", logging.WARNING if surprising else logging.INFO)
    return reason


class KernelPaths(dict):
    """{layer: {op: path}}, as kernel_paths returns it. Printed, the layers that took the same paths share one line
    and each reason is written once, as a numbered note."""

    def __str__(self) -> str:
        groups: dict[tuple, list[str]] = {}
        for layer, layer_paths in self.items():
            groups.setdefault(tuple(layer_paths.items()), []).append(layer)
        reasons: list[str] = []
        lines = []
        for layer_paths, layers in groups.items():
            cells = []
            for op, path in layer_paths:
                taken, _, reason = path.partition(": ")
                if reason:
                    if reason not in reasons:
                        reasons.append(reason)
                    taken += f" [{reasons.index(reason) + 1}]"
                cells.append(f"{op} {taken}")
            where = layers[0] if len(layers) == 1 else f"{len(layers)} layers ({layers[0]} ... {layers[-1]})"
            lines.append(f"{where}: {', '.join(cells)}")
        return "\n".join(lines + [f"[{i}] {reason}" for i, reason in enumerate(reasons, 1)])

    __repr__ = __str__
