"""Frozen CPU inference: a CvT compiled ahead of time into one package of native code, for one input shape and dtype.

  freeze(model, batch_size=8, image_size=224, dtype=torch.bfloat16)  ->  FrozenCvt, compiled now, on this CPU
  frozen(pixel_values)                                                 the model's outputs, from the compiled code
  frozen.save("cvt.pt2")  /  load_frozen("cvt.pt2")                    the package, in a new process, in seconds

How: torch.export traces the eager path (float32 or bfloat16, eval mode); AOTInductor compiles it with inductor's
freezing, which folds every BatchNorm into its convolution, prepacks the weights of the linear layers and
convolutions for oneDNN (AMX or AVX-512 where the CPU has them) and fuses LayerNorm, GELU and the residual adds into
C++ loops. The package is a torch .pt2 archive; it records what it was compiled for (torch, the CPU target, dtype,
shape, the config), and load_frozen refuses, in one line, a package this process cannot run, before any of its code
is loaded.

A frozen model is a snapshot: the weights are constants of the compiled code, so edits to the model after freezing
(training, a LoRA merge, load_state_dict) do not reach it. That is why it is never what from_pretrained returns.
It runs on the CPU only: on a GPU, the Triton kernels under torch.compile or a CUDA graph are the fast path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import time
import warnings
import weakref
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checks import check_image_size
from .config import CvtConfig
from .cpu_target import CpuTarget, cannot_run, this_cpu
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    InputError,
    InputTypeError,
    one_line,
)
from .files import replacing
from .image_processing import CvtImageProcessor
from .outputs import BaseModelOutputWithCLSToken, ImageClassifierOutputWithNoAttention

FORMAT = "cvt_fast.frozen/1"
METADATA_KEY = "cvt_fast.frozen"  # in the package's AOTInductor metadata
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The numerics rule a compiled model is held to when it is made: its error against float64 at most twice the eager
# path's in the same dtype, plus a floor (relative to the largest output magnitude).
VALIDATION_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
VALIDATION_IMAGES = 2


class FreezeError(RuntimeError):
    """The compiled model does not compute what the eager model computes: nothing is returned or written."""


class PackageMismatchError(CheckpointError):
    """A frozen package this process cannot run: compiled for another CPU class or another torch."""


@dataclass
class FrozenInfo:
    """What a package was compiled from and for."""

    model_class: str  # "CvtForImageClassification" or "CvtModel"
    outputs: list[str]  # the output fields, in the order the compiled code returns them
    input_shape: tuple[int, int, int, int]  # (batch, channels, height, width)
    dtype: torch.dtype
    config: CvtConfig
    target: CpuTarget
    torch_version: str
    cvt_fast_version: str
    autotune: bool
    dynamic_batch: bool = False  # any batch up to input_shape[0] runs as it is (else smaller ones are padded)
    processor: dict | None = None  # the image processor's settings, when freeze was given one
    # Known to the process that froze it (not stored in the package): compile seconds, and the errors against
    # float64 it was checked with.
    compile_s: float | None = None
    validation: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "model_class": self.model_class, "outputs": self.outputs,
            "input_shape": list(self.input_shape), "dtype": str(self.dtype).removeprefix("torch."),
            "config": self.config.to_dict(), "target": self.target.as_dict(), "torch": self.torch_version,
            "cvt_fast": self.cvt_fast_version, "autotune": self.autotune, "dynamic_batch": self.dynamic_batch,
            "processor": self.processor,
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> FrozenInfo:
        data = json.loads(text)
        return cls(
            model_class=data["model_class"],
            outputs=list(data["outputs"]),
            input_shape=tuple(data["input_shape"]),
            dtype=DTYPES[data["dtype"]],
            config=CvtConfig.from_dict(data["config"]),
            target=CpuTarget.from_dict(data["target"]),
            torch_version=data["torch"],
            cvt_fast_version=data["cvt_fast"],
            autotune=bool(data["autotune"]),
            dynamic_batch=bool(data.get("dynamic_batch", False)),
            processor=data.get("processor"),
        )


class FrozenCvt:
    """A CvT compiled ahead of time for one input shape and dtype on this CPU class (see cvt_fast.frozen).

    Call it like the model it was frozen from: `frozen(pixel_values)` returns the same output type (logits; or the
    last hidden state and cls token), for pixel_values of the frozen dtype, channels, height and width, and a batch of
    at most `batch_size` images (a smaller batch runs padded to `batch_size`, the same answers at the cost of a full
    batch, unless it was frozen with dynamic_batch). Anything else is refused with the frozen shape named.

    A snapshot: edits to the model after freezing do not reach it; freeze again to take them. Inference only: no
    gradients flow through it, and it has no .train(), .to() or parameters."""

    def __init__(self, runner, info: FrozenInfo, package: Path, owned_folder: Path | None = None):
        self._runner = runner
        self.info = info
        self._package = package
        if owned_folder is not None:  # the compile's own temporary folder, deleted with this object
            self._cleanup = weakref.finalize(self, shutil.rmtree, owned_folder, True)

    # ---- what it is ---------------------------------------------------------------------------------------------

    @property
    def config(self) -> CvtConfig:
        return self.info.config

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def batch_size(self) -> int:
        return self.info.input_shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.info.input_shape[2], self.info.input_shape[3]

    @property
    def processor(self) -> CvtImageProcessor | None:
        """The image processor it was frozen with, if any (the CLI stores the checkpoint's)."""
        return CvtImageProcessor(**self.info.processor) if self.info.processor else None

    def __repr__(self) -> str:
        info = self.info
        batch, channels, height, width = info.input_shape
        batches = f"1 to {batch}" if info.dynamic_batch and batch > 1 else str(batch)
        return (
            f"FrozenCvt({info.model_class}, pixel_values ({batches}, {channels}, {height}, {width}) "
            f"{str(info.dtype).removeprefix('torch.')}, compiled for {info.target.describe()} with torch "
            f"{info.torch_version}; a snapshot: edits to the model after freezing do not reach it)"
        )

    # ---- running it ---------------------------------------------------------------------------------------------

    def __call__(self, pixel_values: torch.Tensor | None = None, return_dict: bool | None = None):
        count = self._check(pixel_values)
        batch, channels, height, width = self.info.input_shape
        x = pixel_values.contiguous()
        if count < batch and not self.info.dynamic_batch:  # per-image in eval mode: padding changes no other row
            x = torch.cat((x, x.new_zeros(batch - count, channels, height, width)))
        outputs = [t[:count] for t in self._runner([x])]
        fields = dict(zip(self.info.outputs, outputs, strict=True))
        if self.info.model_class == "CvtForImageClassification":
            result = ImageClassifierOutputWithNoAttention(logits=fields["logits"])
        else:
            result = BaseModelOutputWithCLSToken(
                last_hidden_state=fields["last_hidden_state"], cls_token_value=fields.get("cls_token_value")
            )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return result if return_dict else result.to_tuple()

    forward = __call__

    def _check(self, pixel_values) -> int:
        """The number of images, once pixel_values is one the compiled code takes."""
        batch, channels, height, width = shape = self.info.input_shape
        expected = f"({batch} or fewer, {channels}, {height}, {width}) {str(self.dtype).removeprefix('torch.')}"
        if not isinstance(pixel_values, torch.Tensor):
            raise InputTypeError(f"pixel_values must be a torch.Tensor of shape {expected}, got "
                                 f"{type(pixel_values).__name__}")  # fmt: skip
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != shape[1:] or not 1 <= len(pixel_values) <= batch:
            raise InputError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this model was frozen for {expected} "
                f"(freeze again for another shape)"
            )
        if pixel_values.dtype != self.dtype:
            raise InputTypeError(f"pixel_values is {pixel_values.dtype}; this model was frozen for {self.dtype} "
                                 f"(pixel_values.to({self.dtype}))")  # fmt: skip
        if pixel_values.device.type != "cpu":
            raise InputError(f"pixel_values is on {pixel_values.device}; a frozen model runs on the CPU")
        if pixel_values.requires_grad and torch.is_grad_enabled():
            raise InputError("pixel_values requires grad, but a frozen model is inference only: no gradient flows "
                             "through it (use the model itself to train)")  # fmt: skip
        return len(pixel_values)

    # ---- the package --------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the package (a torch .pt2 archive) to `path`, replacing what was there in one step. load_frozen reads
        it back, in any process on a CPU of the same class with the same torch, without compiling."""
        path = Path(path)
        if path.suffix != ".pt2":
            raise InputError(f"save: {path} should end in .pt2 (a torch AOTInductor package)")
        if path.is_dir():
            raise InputError(f"save: {path} is a folder; expected the path of the .pt2 file to write")
        if not path.parent.is_dir():
            raise InputError(f"save: {path.parent} is not a folder to write {path.name} in")
        try:
            with replacing(path) as temporary:
                shutil.copyfile(self._package, temporary)
        except OSError as error:
            raise CheckpointWriteError(f"{path}: cannot be written ({error.strerror or error})") from None
        return path


# ---- freezing -----------------------------------------------------------------------------------------------


class _Outputs(nn.Module):
    """What the compiled code computes: the model's output tensors, as a tuple."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values, return_dict=True)
        return tuple(getattr(outputs, name) for name in self.names)


def freeze(
    model: nn.Module,
    *,
    batch_size: int = 1,
    image_size: int | tuple[int, int] = 224,
    dtype: torch.dtype | str | None = None,
    autotune: bool = False,
    dynamic_batch: bool = False,
    processor: CvtImageProcessor | None = None,
) -> FrozenCvt:
    """Compile a snapshot of `model` (a cvt_fast or transformers CvtForImageClassification / CvtModel, in eval mode,
    on the CPU) for pixel_values of (batch_size, channels, height, width) in `dtype` (default: the model's; float32 or
    bfloat16), on this CPU. The model is left as it was: it is copied, and the copy is cast.

    autotune: also let inductor time its own C++ GEMM templates (AMX micro-kernels in bfloat16) against oneDNN's for
    every matrix product, keeping the faster; compiling takes about twice as long. dynamic_batch: compile for any
    batch from 1 to batch_size (no padding; the code cannot specialise on the batch, which can cost speed).
    processor: stored in the package, for whoever loads it to preprocess images as the checkpoint does.

    The compiled model is checked before it is returned: on two of the example images, its error against float64
    must be within twice the eager path's in the same dtype plus a floor, else FreezeError."""
    model = _cvt_fast_model(model)
    config = model.config
    height, width = _image_size(image_size)
    check_image_size(config, height, width)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    dtype = _frozen_dtype(dtype, model)
    names = ["logits"] if type(model).__name__ == "CvtForImageClassification" else ["last_hidden_state"]
    if names == ["last_hidden_state"] and config.cls_token[config.num_stages - 1]:
        names.append("cls_token_value")

    snapshot = copy.deepcopy(model).to(dtype=dtype).eval()  # the caller's model keeps its dtype and weights
    snapshot.set_backend("eager")
    traced = _Outputs(snapshot, names).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch_size, config.num_channels, height, width, generator=generator).to(dtype)

    folder = Path(tempfile.mkdtemp(prefix="cvt_fast_frozen_"))
    try:
        start = time.perf_counter()
        target = this_cpu()
        info = FrozenInfo(
            model_class=type(model).__name__, outputs=names, input_shape=tuple(example.shape), dtype=dtype,
            config=config.copy(), target=target, torch_version=torch.__version__, cvt_fast_version=_version(),
            autotune=autotune, dynamic_batch=dynamic_batch and batch_size > 1,
            processor=processor.to_dict() if processor is not None else None,
        )  # fmt: skip
        package = folder / "cvt_frozen.pt2"
        with torch.no_grad(), _quiet(), _inductor_cache_for(target):  # freezing folds constants only without grad
            dynamic = None
            if info.dynamic_batch:
                dynamic = {"pixel_values": {0: torch.export.Dim("batch", min=1, max=batch_size)}}
            program = torch.export.export(traced, (example,), dynamic_shapes=dynamic)
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(package), inductor_configs=_inductor_configs(info, autotune)
            )
        info.compile_s = time.perf_counter() - start
        frozen = FrozenCvt(_load_runner(package), info, package, owned_folder=folder)
        info.validation = _validate(frozen, snapshot, example)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # nothing half-made is left behind, whatever failed
        raise
    return frozen


def freeze_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    batch_size: int = 1,
    image_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | str = torch.float32,
    autotune: bool = False,
    dynamic_batch: bool = False,
    model_class: type | None = None,
    say=None,
) -> FrozenCvt:
    """A checkpoint (a save_pretrained folder or a hub id) frozen for this CPU: loaded as `model_class`, by default
    its classifier when it has a head, else its base model; its preprocessing stored in the package (and its crop size
    the default image size). `say(line)`, when given, hears what is being compiled before the minute or two it takes."""
    from .export import load_for_export
    from .hub import resolve_checkpoint_dir
    from .image_processing import PREPROCESSOR_NAME

    checkpoint = resolve_checkpoint_dir(name_or_path)
    processor = None
    if (checkpoint / PREPROCESSOR_NAME).is_file():
        processor = CvtImageProcessor.from_pretrained(checkpoint)
    if image_size is None:
        image_size = processor.size if processor is not None else 224
    model = (
        load_for_export(checkpoint) if model_class is None else model_class.from_pretrained(checkpoint, device="cpu")
    )
    if say is not None:
        height, width = _image_size(image_size)
        shape = f"({batch_size}, {model.config.num_channels}, {height}, {width})"
        say(f"compiling {checkpoint.name} ({type(model).__name__}) for pixel_values {shape} "
            f"{str(_frozen_dtype(dtype, model)).removeprefix('torch.')} on this CPU (a minute or two"
            f"{', twice that with autotuning' if autotune else ''})")  # fmt: skip
    return freeze(model, batch_size=batch_size, image_size=image_size, dtype=dtype, autotune=autotune,
                  dynamic_batch=dynamic_batch, processor=processor)  # fmt: skip


def _cvt_fast_model(model: nn.Module) -> nn.Module:
    from .modeling import CvtForImageClassification, CvtModel

    if type(model).__module__.startswith("transformers."):
        from .patching import from_transformers

        model = from_transformers(model)
    if not isinstance(model, (CvtForImageClassification, CvtModel)):
        raise InputTypeError(
            f"freeze takes a CvtForImageClassification or CvtModel (cvt_fast's or transformers'), got "
            f"{type(model).__name__}"
        )
    if model.training:
        raise InputError(
            "the model is in training mode; call model.eval() before freezing (the frozen copy is inference only: "
            "BatchNorm on its running statistics, no dropout)"
        )
    device = model.device
    if device.type != "cpu":
        raise InputError(
            f"the model is on {device}; freeze compiles for the CPU (on a GPU, the Triton kernels under "
            "torch.compile or a CUDA graph are the fast path: see the docs on kernels)"
        )
    return model


def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        return image_size, image_size
    if (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in image_size)
    ):
        return int(image_size[0]), int(image_size[1])
    raise InputError(f"image_size must be an int or a (height, width) pair, got {image_size!r}")


def _frozen_dtype(dtype, model: nn.Module) -> torch.dtype:
    if dtype is None:
        dtype = model.dtype
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype not in DTYPES.values():
        raise InputError(f"dtype must be torch.float32 or torch.bfloat16 for the frozen CPU path, got {dtype}")
    return dtype


def _version() -> str:
    from . import __version__

    return __version__


def _inductor_configs(info: FrozenInfo, autotune: bool) -> dict:
    configs = {"freezing": True, "aot_inductor.metadata": {METADATA_KEY: info.to_json()}}
    if autotune:
        configs.update({"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"})
    return configs


@contextlib.contextmanager
def _inductor_cache_for(target: CpuTarget) -> Iterator[None]:
    """Inductor's on-disk cache (torch 2.13) is not keyed by the vector ISA: code compiled for AVX-512 is served to a
    process capped at AVX2 (NaNs, or a crash). Unless the user chose a cache folder, compile into one per target."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        yield
        return
    tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{target.capability}_{'bf16' if target.onednn_native_bfloat16 else 'nobf16'}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_cvt_fast_{tag.lower()}"
    try:
        yield
    finally:
        if chosen is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = chosen


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export and AOTInductor warn of PyTorch's own deprecations (pytree's LeafSpec); none is about the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _validate(frozen: FrozenCvt, snapshot: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Errors of the compiled model and of the eager path in its dtype, both against float64, on a few images;
    FreezeError when the compiled one breaks the rule."""
    count = min(VALIDATION_IMAGES, len(example))
    with torch.inference_mode():
        compiled = frozen(example).to_tuple()
        eager = snapshot(example[:count], return_dict=True).to_tuple()
        reference = copy.deepcopy(snapshot).double()(example[:count].double(), return_dict=True).to_tuple()
    errors: dict[str, float] = {}
    for name, got, same_dtype, exact in zip(frozen.info.outputs, compiled, eager, reference, strict=True):
        scale = exact.abs().max().clamp_min(1e-30)
        error = ((got[:count].double() - exact).abs().max() / scale).item()
        allowed = 2 * ((same_dtype.double() - exact).abs().max() / scale).item() + VALIDATION_FLOOR[frozen.dtype]
        if not torch.isfinite(got).all() or not error <= allowed:
            raise FreezeError(
                f"the compiled model's {name} is {error:.1e} from float64 (relative), over the {allowed:.1e} allowed "
                f"(twice the eager path's error in {frozen.dtype} plus a floor): nothing was frozen"
            )
        errors[name] = error
    return errors


# ---- packages -----------------------------------------------------------------------------------------------


def _metadata_files(archive: zipfile.ZipFile) -> list[str]:
    return [name for name in archive.namelist() if name.endswith("_metadata.json") and "/aotinductor/" in name]


def read_package_info(path: str | os.PathLike) -> FrozenInfo:
    """What a package was compiled for, read from the archive alone (no native code is loaded)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a .pt2 file written by FrozenCvt.save")
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = [json.loads(archive.read(name)) for name in _metadata_files(archive)]
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not a torch .pt2 package ({error})") from None
    records = [m[METADATA_KEY] for m in metadata if isinstance(m, dict) and METADATA_KEY in m]
    if not records:
        raise CheckpointError(
            f"{path}: not a cvt_fast frozen package (no cvt_fast record in it; other AOTInductor packages load with "
            "torch._inductor.aoti_load_package)"
        )
    try:
        data = json.loads(records[0])
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: package format {data.get('format')!r}; this cvt_fast reads {FORMAT!r}")
        return FrozenInfo.from_json(records[0])
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: its cvt_fast record is damaged ({type(error).__name__}: {error})") from None


def load_frozen(path: str | os.PathLike) -> FrozenCvt:
    """A package written by FrozenCvt.save (or `cvt-fast export --format pt2`), ready to run, without compiling and
    without transformers. Refused, before any of its native code is loaded, when this process cannot run it: another
    torch version, or a CPU (or a capped ISA: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) without the instructions it was
    compiled for."""
    path = Path(path)
    info = read_package_info(path)
    if info.torch_version != torch.__version__:
        raise PackageMismatchError(
            f"{path} was compiled with torch {info.torch_version}; this is torch {torch.__version__}: freeze and save "
            "it again with this torch"
        )
    here = this_cpu()
    reason = cannot_run(info.target, here)
    if reason is not None:
        raise PackageMismatchError(
            f"{path} cannot run on this CPU: {reason} (compiled for {info.target.describe()}, this is "
            f"{here.describe()}); freeze and save it again on a CPU of this class"
        )
    return FrozenCvt(_load_runner(path), info, path)


class _Runner:
    """The package's compiled code, ready to run: list of input tensors -> list of output tensors.

    AOTInductor keeps a package's weights in one block of memory copied from the shared library, and oneDNN's matrix
    products read their prepacked weights from there markedly slower than from weights allocated one by one: measured
    on an AMX Xeon, cvt-13 in bfloat16 at batch 8 ran 1.28x faster, and 1.05x to 1.08x in the other cases, once each
    weight was copied into its own allocation (bench/results/NOTES.md). So every weight is copied out once, at load,
    and handed back to the runner, which then reads the copies (kept alive here) and frees its block."""

    def __init__(self, package: Path):
        self._folder = Path(tempfile.mkdtemp(prefix="cvt_fast_package_"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
        with zipfile.ZipFile(package) as archive:
            libraries = [n for n in archive.namelist() if "/aotinductor/" in n and n.endswith(".so")]
            if len(libraries) != 1:
                raise CheckpointError(f"{package}: expected one compiled library in the package, found "
                                      f"{len(libraries)}")  # fmt: skip
            archive.extractall(self._folder)
        with _quiet():
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(self._folder / libraries[0]), 1)
        self._weights = self._own_weights()

    def _own_weights(self) -> dict[str, torch.Tensor] | None:
        """Every weight copied into an allocation of its own and given to the runner (see the class); None, and the
        runner's own block kept, where this torch's runner cannot take them."""
        runner = self._runner
        try:
            names = {fqn: name for name, fqn in runner.get_constant_names_to_original_fqns().items()}
            weights = {names[fqn]: tensor.clone() for fqn, tensor in runner.extract_constants_map(False).items()}
            runner.update_constant_buffer(weights, True, True, True)  # into the spare buffer, user-managed
            runner.swap_constant_buffer()
            runner.free_inactive_constant_buffer()
        except (AttributeError, KeyError, RuntimeError, TypeError) as error:
            from .ops.dispatch import log_once

            log_once(f"frozen packages read their weights where AOTInductor put them (slower): {one_line(error)}")
            return None
        return weights

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._runner.run(inputs)


def _load_runner(package: Path) -> _Runner:
    return _Runner(package)


__all__ = [
    "FreezeError",
    "FrozenCvt",
    "PackageMismatchError",
    "freeze",
    "freeze_checkpoint",
    "load_frozen",
    "read_package_info",
]
