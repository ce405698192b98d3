"""Freezing: a snapshot of a CvT built on each engine asked for (with engine="auto", every one installed that can
take the dtype), each checked against float64, timed on this CPU with torch's thread count when there is a choice,
and the fastest correct one kept, with every engine's figures in its info.trials.

  freeze(model, ...)             the kept FrozenCvt (FreezeError when no engine computes what the model computes)
  freeze_each(model, engines)    every engine's FrozenCvt, or the Trial that says why not; untimed (the benchmark's)
  freeze_checkpoint(name, ...)   a checkpoint loaded and frozen, its preprocessing recorded
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checks import check_image_size
from ..cpu_target import CpuTarget, this_cpu
from ..errors import InputError, InputTypeError, MissingDependencyError, one_line
from ..image_processing import PREPROCESSOR_NAME, CvtImageProcessor
from ..testing import relative_error
from ..timing import interleaved
from ..version import __version__
from .engines import NAMES, engine
from .graph import Graphs
from .record import DTYPES, FrozenInfo, Trial, dtype_name
from .snapshot import FrozenCvt, OwnedFolder

ENGINE_CHOICES = ("auto", *NAMES)
FASTEST = "fastest"  # the dtype argument that picks bfloat16 where this CPU computes it natively, else float32
# The numerics rule a frozen model is held to when it is made: its error against float64 at most twice the eager
# path's in the same dtype, plus a floor (relative to the largest output magnitude).
VALIDATION_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
VALIDATION_IMAGES = 2
TIMING_ROUNDS = 5  # interleaved rounds when engines are compared (each of BLOCK calls, the first not counted)


class FreezeError(RuntimeError):
    """No engine computes what the eager model computes (or the engine asked for does not): nothing is returned."""


@dataclass
class _Plan:
    """What one freeze makes, every argument checked before any work."""

    model: nn.Module  # cvt_fast's, eval mode, on the CPU; never changed
    outputs: list[str]
    input_shape: tuple[int, int, int, int]
    dtype: torch.dtype
    dynamic_batch: bool
    autotune: bool
    processor: dict | None
    processor_source: str | None

    def info(self, module, target: CpuTarget) -> FrozenInfo:
        return FrozenInfo(
            model_class=type(self.model).__name__, outputs=self.outputs, input_shape=self.input_shape,
            dtype=self.dtype, config=self.model.config.copy(), target=target, torch_version=torch.__version__,
            cvt_fast_version=__version__, engine=module.NAME, engine_version=module.version(),
            threads=torch.get_num_threads(), autotune=self.autotune,
            dynamic_batch=getattr(module, "ALWAYS_DYNAMIC_BATCH", False) or self.dynamic_batch,
            processor=self.processor, processor_source=self.processor_source,
        )  # fmt: skip


def freeze(
    model: nn.Module,
    *,
    batch_size: int = 1,
    image_size: int | tuple[int, int] = 224,
    dtype: torch.dtype | str | None = None,
    engine: str = "auto",
    autotune: bool = False,
    dynamic_batch: bool = False,
    processor: CvtImageProcessor | None = None,
    say: Callable[[str], None] | None = None,
) -> FrozenCvt:
    """A snapshot of `model` (a cvt_fast or transformers CvtForImageClassification / CvtModel, in eval mode, on the
    CPU) for pixel_values of (batch_size, channels, height, width) in `dtype`, on the engine that runs it fastest on
    this CPU. The model is left as it was: it is copied, and the copy is cast.

    dtype: torch.float32 or torch.bfloat16 (or their names); None, the model's; "fastest", bfloat16 where this CPU
    computes it natively, else float32 (info.dtype says which).
    engine: "auto" builds it on every engine installed that takes the dtype, checks each against float64, times each
    on this CPU with torch's thread count, and keeps the fastest (info.trials holds every engine's figures and the
    reasons any was skipped or failed); "inductor", "onnxruntime" or "openvino" builds on that one alone.
    autotune: inductor also times its own C++ GEMM templates against oneDNN's (twice the compile).
    dynamic_batch: any batch from 1 to batch_size runs as it is (ONNX Runtime always does), rather than padded to
    batch_size (the code cannot specialise on the batch, which can cost speed).
    processor: the preprocessing to record; by default the checkpoint's, where the model was loaded from a folder
    with a preprocessor_config.json, else CvT's default for the image size (info.processor_source says which).
    say(line): hears what is being built, before the seconds or minutes it takes.

    Every engine's result is checked before it is kept: on two of the example images, its error against float64 must
    be within twice the eager path's error in the same dtype plus a floor. FreezeError when none passes (or the
    engine asked for fails)."""
    names = _engines_asked(engine)
    plan = _plan(model, batch_size, image_size, dtype, dynamic_batch, autotune, processor)
    start = time.perf_counter()
    built, trials = _build_each(plan, names, explicit=engine != "auto", say=say)
    if not built:
        raise FreezeError("no engine could freeze this model: " + "; ".join(t.describe() for t in trials))
    _, chosen = _fastest(built, say)
    chosen.info.trials = trials
    chosen.info.compile_s = time.perf_counter() - start
    return chosen


def freeze_each(
    model: nn.Module,
    engines: list[str],
    *,
    batch_size: int = 1,
    image_size: int | tuple[int, int] = 224,
    dtype: torch.dtype | str | None = None,
    autotune: bool = False,
    dynamic_batch: bool = False,
    processor: CvtImageProcessor | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, FrozenCvt | Trial]:
    """Each engine of `engines` built and checked as freeze does (the other arguments are freeze's), from one set of
    traces: {engine: FrozenCvt, or the Trial that says why it was skipped or failed}. An engine run more than one way
    (settings_to_try) keeps its fastest; engines are not timed against each other. Each FrozenCvt's info.compile_s is
    its own build (the shared ONNX export counted in the first engine that needed it)."""
    unknown = [name for name in engines if name not in NAMES]
    if unknown:
        raise InputError(f"engines must be some of {', '.join(map(repr, NAMES))}, got {', '.join(map(repr, unknown))}")
    plan = _plan(model, batch_size, image_size, dtype, dynamic_batch, autotune, processor)
    built, trials = _build_each(plan, list(dict.fromkeys(engines)), explicit=False, say=say)
    result: dict[str, FrozenCvt | Trial] = {trial.engine: trial for trial in trials}
    for name in dict.fromkeys(trial.engine for trial, _ in built):
        _, frozen = _fastest([pair for pair in built if pair[0].engine == name], say)
        frozen.info.trials = [trial for trial in trials if trial.engine == name]
        result[name] = frozen
    return result


def freeze_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    batch_size: int = 1,
    image_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | str = torch.float32,
    engine: str = "auto",
    autotune: bool = False,
    dynamic_batch: bool = False,
    model_class: type | None = None,
    say: Callable[[str], None] | None = None,
) -> FrozenCvt:
    """A checkpoint (a save_pretrained folder or a hub id) frozen for this CPU: loaded as `model_class`, by default
    its classifier when it has a head, else its base model; its preprocessing recorded (and its crop size the default
    image size)."""
    from ..export import load_for_export
    from ..hub import resolve_checkpoint_dir

    _engines_asked(engine)
    checkpoint = resolve_checkpoint_dir(name_or_path)
    if image_size is None:
        processor = _checkpoint_processor(checkpoint)
        image_size = processor.size if processor is not None else 224
    model = (
        load_for_export(checkpoint) if model_class is None else model_class.from_pretrained(checkpoint, device="cpu")
    )
    return freeze(model, batch_size=batch_size, image_size=image_size, dtype=dtype, engine=engine, autotune=autotune,
                  dynamic_batch=dynamic_batch, say=say)  # fmt: skip


# ---- checking what was asked --------------------------------------------------------------------------------


def _engines_asked(engine_name) -> list[str]:
    if engine_name not in ENGINE_CHOICES:
        raise InputError(f"engine must be one of {', '.join(map(repr, ENGINE_CHOICES))}, got {engine_name!r}")
    return list(NAMES) if engine_name == "auto" else [engine_name]


def _plan(model, batch_size, image_size, dtype, dynamic_batch, autotune, processor) -> _Plan:
    recorded, source = _preprocessing(model, processor, image_size)
    model = _cvt_fast_model(model)
    config = model.config
    height, width = _image_size(image_size)
    check_image_size(config, height, width)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    outputs = ["logits"] if type(model).__name__ == "CvtForImageClassification" else ["last_hidden_state"]
    if outputs == ["last_hidden_state"] and config.cls_token[config.num_stages - 1]:
        outputs.append("cls_token_value")
    return _Plan(model, outputs, (batch_size, config.num_channels, height, width), _frozen_dtype(dtype, model),
                 dynamic_batch and batch_size > 1, autotune, recorded, source)  # fmt: skip


def _cvt_fast_model(model: nn.Module) -> nn.Module:
    from ..modeling import CvtForImageClassification, CvtModel

    if type(model).__module__.startswith("transformers."):
        from ..patching import from_transformers

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
    if dtype == FASTEST:
        from ..ops.cpu_linear import cpu_has_native_bfloat16

        return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype not in DTYPES.values():
        raise InputError(f"dtype must be torch.float32, torch.bfloat16 or {FASTEST!r} for a frozen model, got {dtype}")
    return dtype


def _preprocessing(model: nn.Module, processor, image_size) -> tuple[dict | None, str | None]:
    """(the processor's settings to record, where they came from): the one given; the checkpoint's, when the model
    was loaded from a folder (or a hub id in the local cache) with a preprocessor_config.json; else CvT's default
    for a square image size (none for another)."""
    if processor is not None:
        if not isinstance(processor, CvtImageProcessor):
            raise InputTypeError(f"processor must be a CvtImageProcessor, got {type(processor).__name__}")
        return processor.to_dict(), "given"
    checkpoint = _checkpoint_folder(getattr(model, "name_or_path", None))
    found = _checkpoint_processor(checkpoint) if checkpoint is not None else None
    if found is not None:
        return found.to_dict(), "checkpoint"
    height, width = _image_size(image_size)
    return (CvtImageProcessor(size=height).to_dict(), "default") if height == width else (None, None)


def _checkpoint_folder(name_or_path) -> Path | None:
    """The local folder a model was loaded from (transformers' and cvt_fast's models keep the name in
    name_or_path), never fetched: a hub id counts only where it is in the local cache."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        return None
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from ..hub import resolve_checkpoint_dir

    try:
        return resolve_checkpoint_dir(name_or_path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a folder, not cached, no huggingface_hub: no checkpoint to read
        return None


def _checkpoint_processor(checkpoint: Path) -> CvtImageProcessor | None:
    if (checkpoint / PREPROCESSOR_NAME).is_file():
        return CvtImageProcessor.from_pretrained(checkpoint)
    return None


# ---- building, checking and timing ----------------------------------------------------------------------------


def _build_each(plan: _Plan, names: list[str], explicit: bool, say) -> tuple[list[tuple[Trial, FrozenCvt]], list]:
    """([(trial, frozen)] of the engines that built and passed the check, [every trial]). With `explicit` (one engine
    asked for by name), its refusal or failure is raised instead of recorded."""
    say = say or (lambda line: None)
    here = this_cpu()
    trials: list[Trial] = []
    usable = []
    for name in names:
        module = engine(name)
        missing, refused = module.missing(), module.refuses(plan.dtype, here)
        if explicit and missing:
            raise MissingDependencyError(f"engine {name!r}: {missing}")
        if explicit and refused:
            raise InputError(f"engine {name!r}: {refused}")
        if missing or refused:
            trials.append(Trial(name, "skipped", missing or refused))
        else:
            usable.append(module)
    built: list[tuple[Trial, FrozenCvt]] = []
    if not usable:
        return built, trials

    snapshot = copy.deepcopy(plan.model).to(dtype=plan.dtype).eval()  # the caller's model keeps its dtype
    snapshot.set_backend("eager")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(plan.input_shape, generator=generator).to(plan.dtype)
    references = _references(snapshot, example)
    scratch = Path(tempfile.mkdtemp(prefix="cvt_fast_freeze_"))
    try:
        graphs = Graphs(plan.model, snapshot, plan.outputs, example, plan.dynamic_batch, scratch)
        for module in usable:
            say(f"freezing on {module.NAME} for {plan.info(module, here).describe_shape()} on this CPU")
            for trial, frozen in _build(module, plan, here, graphs, example, references, explicit):
                trials.append(trial)
                if frozen is not None:
                    built.append((trial, frozen))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    trials.sort(key=lambda trial: names.index(trial.engine))  # in the engines' order, skipped ones among them
    return built, trials


def _build(module, plan: _Plan, here: CpuTarget, graphs: Graphs, example, references, explicit: bool):
    """[(trial, FrozenCvt or None)] for one engine: built once, then run each way it offers (settings_to_try), each
    checked against float64."""
    start = time.perf_counter()
    folder = OwnedFolder(Path(tempfile.mkdtemp(prefix=f"cvt_fast_frozen_{module.NAME}_")))
    info = plan.info(module, here)
    try:
        files = module.build(graphs, info, folder.path)
    except Exception as error:
        return [_failed(module.NAME, {}, error, start, explicit)]
    build_s = time.perf_counter() - start
    results, failures = [], []
    for settings in getattr(module, "settings_to_try", lambda info: [{}])(info):
        loading = time.perf_counter()
        variant = dataclasses.replace(info, settings=settings)
        try:
            frozen = FrozenCvt(module.load(files, variant), variant, files, folder)
            errors = _check(frozen, example, references)
        except Exception as error:
            failures.append((settings, error))
            continue
        seconds = build_s + time.perf_counter() - loading
        trial = Trial(module.NAME, "built", settings=settings, build_s=seconds, errors=errors)
        frozen.info.compile_s, frozen.info.validation, frozen.info.trials = seconds, errors, [trial]
        results.append((trial, frozen))
    if failures and not results and explicit:  # the engine named failed every way: say why
        _failed(module.NAME, *failures[0], start, explicit)
    return results + [_failed(module.NAME, settings, error, start, False) for settings, error in failures]


def _failed(name: str, settings: dict, error: Exception, start: float, explicit: bool) -> tuple[Trial, None]:
    """The trial of an engine that failed to build or to pass its check; raised instead when it was named."""
    if explicit and isinstance(error, FreezeError):
        raise error
    reason = str(error) if isinstance(error, FreezeError) else f"{type(error).__name__}: {one_line(error)}"
    if explicit:
        raise FreezeError(f"{name} could not freeze this model ({reason})") from error
    return Trial(name, "failed", reason, settings=settings, build_s=time.perf_counter() - start), None


def _references(snapshot: nn.Module, example: torch.Tensor) -> tuple[tuple, tuple]:
    """(the eager path's outputs in the frozen dtype, the float64 outputs) on the first VALIDATION_IMAGES images."""
    images = example[:VALIDATION_IMAGES]
    with torch.inference_mode():
        eager = snapshot(images, return_dict=True).to_tuple()
        exact = copy.deepcopy(snapshot).double()(images.double(), return_dict=True).to_tuple()
    return eager, exact


def _check(frozen: FrozenCvt, example: torch.Tensor, references) -> dict[str, float]:
    """Each output's error against float64, relative to its largest magnitude; FreezeError where it breaks the rule
    (twice the eager path's error in the same dtype plus a floor), or is not finite."""
    eager, exact = references
    count = len(exact[0])
    with torch.inference_mode():
        got = frozen(example).to_tuple()
    errors: dict[str, float] = {}
    for name, output, same_dtype, reference in zip(frozen.info.outputs, got, eager, exact, strict=True):
        error = relative_error(output[:count], reference)
        allowed = 2 * relative_error(same_dtype, reference) + VALIDATION_FLOOR[frozen.dtype]
        if not torch.isfinite(output).all() or not error <= allowed:
            raise FreezeError(
                f"{frozen.engine}'s {name} is {error:.1e} from float64 (relative), over the {allowed:.1e} allowed "
                f"(twice the eager path's error in {dtype_name(frozen.dtype)} plus a floor): nothing was frozen on it"
            )
        errors[name] = error
    return errors


def _time(built: list[tuple[Trial, FrozenCvt]], say) -> None:
    """Each candidate's images/s on the example batch, in interleaved rounds (drift hits every one alike)."""
    if say is not None:
        say(f"timing {', '.join(trial.name for trial, _ in built)} on this CPU ({torch.get_num_threads()} threads)")
    first = built[0][1]
    example = torch.randn(first.info.input_shape).to(first.dtype)
    with torch.inference_mode():
        timings = interleaved({trial.name: lambda r, f=f: f(example) for trial, f in built}, TIMING_ROUNDS)
    for trial, _ in built:
        timing = timings[trial.name]
        trial.images_per_s, trial.spread = first.batch_size / timing.seconds, timing.spread


def _fastest(built: list[tuple[Trial, FrozenCvt]], say) -> tuple[Trial, FrozenCvt]:
    """The fastest of the candidates (timed when there is more than one), each trial marked chosen or slower."""
    if len(built) > 1:
        _time(built, say)
    chosen = max(built, key=lambda pair: pair[0].images_per_s or 0.0)
    for trial, _ in built:
        trial.status = "chosen" if trial is chosen[0] else "slower"
    return chosen


__all__ = ["ENGINE_CHOICES", "FASTEST", "FreezeError", "freeze", "freeze_checkpoint", "freeze_each"]
