"""Checkpoints in transformers' format: find them, read them safely, check every key, write them back.

Reading never runs code from a checkpoint: safetensors first, and a pickle (.bin) only through
torch.load(weights_only=True). A checkpoint whose keys do not fit the model is refused with the keys named;
nothing is silently left at its random initialisation.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .checks import check_device
from .config import CONFIG_NAME, CvtConfig, transformers_cannot_run, transformers_runs_otherwise
from .errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError, ConfigError, one_line
from .files import read_json_object, replacing
from .hub import resolve_checkpoint_dir

logger = logging.getLogger("cvt_fast")

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# BatchNorm's step counter: not a weight, absent from some checkpoints, and unused in eval.
OPTIONAL_SUFFIXES = (".num_batches_tracked",)


# ---- reading weights ------------------------------------------------------------------------------------


def weight_files(directory: Path) -> list[Path]:
    """The weights files of a checkpoint directory, safetensors preferred over pickles."""
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            return _shard_files(directory / index)
    raise CheckpointNotFoundError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def _shard_files(index: Path) -> list[Path]:
    weight_map = read_json_object(index, CheckpointError).get("weight_map")
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(shard, str) for shard in weight_map.values())
    ):
        raise CheckpointError(f'{index}: expected a "weight_map" object of tensor names to shard file names')
    shards = sorted(set(weight_map.values()))
    elsewhere = [s for s in shards if Path(s).name != s or s in ("", ".", "..")]
    if elsewhere:  # shards sit beside their index; a path could make the index read any file on the machine
        raise CheckpointError(f"{index}: shards must be file names in {index.parent}, got {_listing(elsewhere)}")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} names shards that are not there: {_listing(missing)}")
    return [index.parent / s for s in shards]


# ---- reading weights ----------------------------------------------------------------------------------------


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    for file in files:
        for key, tensor in _read_weights(file).items():
            if key in source:
                raise CheckpointError(f"{key} is in two shards, {source[key]} and {file}")
            state_dict[key], source[key] = tensor, file
    return state_dict


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    tensors = _read_safetensors(file) if file.suffix == ".safetensors" else _read_pickle(file)
    _check_tensors(file, tensors)
    # A step counter is int64 in the model: load_state_dict would copy another dtype into it, but assign=True (used
    # to skip initialisation) keeps the checkpoint's, and a bool one would then fail at the first training step.
    return {k: v.to(torch.int64) if k.endswith(OPTIONAL_SUFFIXES) else v for k, v in tensors.items()}


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as error:  # whatever safetensors raises about this file, it is the file's fault
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({one_line(error)}); is it truncated or corrupt?"
        ) from None


def _read_pickle(file: Path) -> Any:
    # Read into memory, not mmap: the model must not depend on a file save_pretrained may overwrite.
    try:
        with warnings.catch_warnings():  # a damaged file's first byte read as a protocol: the refusal says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever torch raises about this file (corrupt, truncated, refused), it is the file's
        # fault; `from None` keeps torch's advice to unpickle untrusted code out of the traceback as well.
        raise CheckpointError(_pickle_refusal(file, error)) from None


def _pickle_refusal(file: Path, error: Exception) -> str:
    text = str(error)
    detail = one_line(text.split("WeightsUnpickler error:", 1)[-1], first_sentence=True)
    if "WeightsUnpickler error:" in text and "global" in detail.lower():
        return (
            f"{file}: refused, it holds Python objects and not only tensors ({detail}); cvt_fast reads .bin "
            "checkpoints with torch.load(weights_only=True), which never runs code from a file"
        )
    try:
        with open(file, "rb") as f:
            head = f.read(2)
    except OSError as reason:
        return f"{file}: cannot be read ({reason.strerror or reason})"
    if not head:
        return f"{file}: empty, so not a PyTorch checkpoint"
    if head == b"PK":  # torch.save writes a zip archive
        return f"{file}: a damaged zip archive, not a readable PyTorch checkpoint ({detail}); is it truncated?"
    return (
        f"{file}: not a PyTorch checkpoint of tensors, neither a zip archive (what torch.save writes) nor a pickle "
        f"of tensors ({detail})"
    )


def _check_tensors(file: Path, data: Any) -> None:
    """A state dict of dense floating-point tensors (BatchNorm's integer step counters aside), or a refusal."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: holds {type(data).__name__}, expected a dict of tensor names to tensors")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {key!r} is {type(value).__name__}, expected a tensor")
        if value.is_meta or value.layout != torch.strided:
            raise CheckpointError(f"{file}: {key} is not a dense tensor with data ({value.layout}, {value.device})")
        if key.endswith(OPTIONAL_SUFFIXES):
            if value.is_complex():
                raise CheckpointError(f"{file}: {key} is {value.dtype}, expected an integer step counter")
        elif not value.is_floating_point():
            raise CheckpointError(f"{file}: {key} is {value.dtype}, expected floating-point weights")


# ---- matching keys ------------------------------------------------------------------------------------------


def adapt_prefix(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Move between CvtModel's keys ("encoder...") and CvtForImageClassification's ("cvt.encoder...", plus the
    head), as transformers does: a backbone loads from a classifier checkpoint, and the reverse."""
    prefix = model.base_model_prefix + "."
    expects_prefix = any(k.startswith(prefix) for k in model.state_dict())
    has_prefix = any(k.startswith(prefix) for k in state_dict)
    if expects_prefix and not has_prefix:
        return {prefix + k: v for k, v in state_dict.items()}
    if has_prefix and not expects_prefix:  # a backbone from a classifier: the head is not wanted
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def compare_keys(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]):
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def _listing(keys: list, limit: int = 12) -> str:
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---- from_pretrained / save_pretrained ----------------------------------------------------------------------


# Built outside inference mode even when called inside it (serving code often loads there): a model made of inference
# tensors could never be trained or fine-tuned afterwards.
@torch.inference_mode(False)
def from_pretrained(
    model_class,
    name_or_path: str | os.PathLike,
    *,
    config: CvtConfig | None = None,
    backend: str | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    ignore_mismatched_sizes: bool = False,
    strict: bool = True,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **config_overrides: Any,
):
    """Build `model_class` from a transformers checkpoint.

    dtype (or torch_dtype): float32 by default, as transformers 4.x; "auto" keeps the checkpoint's dtype, as
        transformers reads it: config.json's dtype (torch_dtype in older files), else the dtype of the weights.
    config_overrides: config attributes to change, e.g. num_labels=10 for a new head (with
        ignore_mismatched_sizes=True, which re-initialises the keys whose shapes changed, with a warning).
    strict=False: initialise missing keys instead of refusing them, with a warning that names them.
    """
    hub_kwargs = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir, token=token).items() if v is not None}
    if local_files_only:
        hub_kwargs["local_files_only"] = True
    # Everything that can be checked before the weights are read is: a refusal then costs no time.
    directory = resolve_checkpoint_dir(name_or_path, **hub_kwargs)
    config = _checkpoint_config(directory, config, config_overrides)
    target_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, config)
    if device is not None:
        device = check_device(device)

    state_dict = read_state_dict(weight_files(directory))
    if target_dtype is None:  # "auto", and config.json names no dtype: the first floating-point weight's decides
        target_dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        model = model_class(config, backend=backend)
    state_dict = adapt_prefix(state_dict, model)
    missing, unexpected, mismatched = compare_keys(model, state_dict)
    _refuse_misfits(
        f"checkpoint {name_or_path} does not fit {model_class.__name__}",
        missing,
        unexpected,
        mismatched,
        strict=strict,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
    )
    reinitialised = [k for k, _, _ in mismatched] + missing
    if reinitialised:
        logger.warning("cvt_fast: newly initialised (not in the checkpoint): %s", _listing(reinitialised))
    if unexpected:
        logger.warning("cvt_fast: ignored checkpoint keys: %s", _listing(unexpected))
    for key in [k for k, _, _ in mismatched] + unexpected:
        state_dict.pop(key)

    model.load_state_dict(state_dict, strict=False, assign=True)
    _materialise_leftovers(model)
    model.to(device=device, dtype=target_dtype)
    model.eval()  # as transformers: a loaded model starts in inference mode
    model.name_or_path = os.fspath(name_or_path)  # as transformers keeps it: where the checkpoint came from
    return model


def _trainer_hint(directory: Path) -> str:
    """What to say of a folder that transformers' Trainer wrote around a cvt_fast model: weights, no config."""
    if (directory / "training_args.bin").is_file():
        return (
            " (transformers' Trainer saves a model that is not its own as weights alone: train with "
            "callbacks=[cvt_fast.integrations.SaveConfigCallback()], or save with model.save_pretrained)"
        )
    return ""


def _checkpoint_config(directory: Path, config: CvtConfig | None, overrides: dict[str, Any]) -> CvtConfig:
    """The checkpoint's config.json (or the config given instead), with the overrides applied."""
    if config is None:
        if not (directory / CONFIG_NAME).is_file():
            raise CheckpointNotFoundError(
                f"{directory} has no {CONFIG_NAME}" + _trainer_hint(directory),
                remedy="pass config= to load its weights",
            )
        config = CvtConfig.from_json_file(directory / CONFIG_NAME)
    elif isinstance(config, CvtConfig):
        config = config.copy()  # the caller's config stays as it was
    else:
        raise TypeError(f"config must be a cvt_fast.CvtConfig, got {type(config).__name__}")
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        raise TypeError(f"from_pretrained got unexpected arguments {unknown} (not CvtConfig attributes either)")
    config.update(**overrides)
    return config


def _refuse_misfits(what, missing, unexpected, mismatched, *, strict: bool, ignore_mismatched_sizes: bool) -> None:
    """Refuse keys that do not fit unless the caller consented, naming them and the argument that consents."""
    problems, remedies = [], []
    if mismatched and not ignore_mismatched_sizes:
        problems.append(f"mis-shaped keys ({_listing([f'{k}: checkpoint {a}, model {b}' for k, a, b in mismatched])})")
        remedies.append("ignore_mismatched_sizes=True re-initialises mis-shaped keys")
    if missing and strict:
        problems.append(f"missing keys ({_listing(missing)})")
        remedies.append("strict=False initialises missing keys")
    if unexpected and strict:
        problems.append(f"unexpected keys ({_listing(unexpected)})")
        remedies.append("strict=False ignores unexpected keys")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems), remedy="from_pretrained: " + ", ".join(remedies))


def _materialise_leftovers(model) -> None:
    """Give real storage, and transformers' initialisation, to the tensors the checkpoint did not provide, and to
    those only: a module's loaded tensors are put back after its initialisation."""
    for module in model.modules():
        slots = [module._parameters, module._buffers]
        if not any(t is not None and t.is_meta for slot in slots for t in slot.values()):
            continue
        # detach(): an alias of the loaded storage that to_empty (which swaps a parameter's .data) leaves alone
        loaded = [
            (slot, name, t.detach()) for slot in slots for name, t in slot.items() if t is not None and not t.is_meta
        ]
        module.to_empty(device="cpu", recurse=False)
        model._init_module(module)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
        with torch.no_grad():
            for slot, name, data in loaded:
                slot[name].data = data


def _resolve_dtype(dtype, config: CvtConfig) -> torch.dtype | None:
    """The dtype to load in; None for "auto" when config.json names none (the weights then decide)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = config.extra.get("dtype")
        if not name:  # absent (or null): transformers then takes the weights' dtype
            return None
        return _floating_dtype(name, f"config.json's dtype {name!r} (read for dtype='auto')", ConfigError)
    if isinstance(dtype, str):
        return _floating_dtype(dtype, f"dtype {dtype!r}", ValueError)
    raise TypeError(f"dtype must be a torch.dtype, a name such as 'float16', or 'auto'; got {type(dtype).__name__}")


def _floating_dtype(name: Any, what: str, error: type[Exception]) -> torch.dtype:
    resolved = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise error(f"{what} is not a floating-point torch dtype (float32, float16, bfloat16, float64)")
    return resolved


def save_pretrained(model, directory: str | os.PathLike, safe_serialization: bool = True) -> None:
    """config.json + model.safetensors with transformers' keys and metadata, so transformers loads it back.

    Each file is written beside its final name and then renamed over it: a save that fails (a full disk, say) leaves
    the folder's previous checkpoint as it was, never a half-written file in its place."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointWriteError(f"{directory}: cannot be made a checkpoint folder ({one_line(error)})") from error
    config = model.config.copy()
    config.extra["architectures"] = [type(model).__name__]
    config.extra["dtype"] = str(model.dtype).removeprefix("torch.")
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = SAFE_WEIGHTS if safe_serialization else BIN_WEIGHTS
    try:
        with replacing(directory / weights) as weights_file, replacing(directory / CONFIG_NAME) as config_file:
            _write_weights(state_dict, weights_file, safe_serialization)
            config_file.write_text(config.to_json_string(), encoding="utf-8")
    except OSError as error:
        raise CheckpointWriteError(
            f"cannot save a checkpoint in {directory} ({one_line(error)}); what the folder held is left as it was"
        ) from error
    _remove_stale_weights(directory, keep=weights)
    unloadable = transformers_cannot_run(model.config)
    if unloadable:
        logger.warning("cvt_fast: saved in %s, which cvt_fast loads but transformers cannot run: %s", directory,
                       "; ".join(unloadable))  # fmt: skip
    otherwise = transformers_runs_otherwise(model.config)
    if otherwise:
        logger.warning("cvt_fast: saved in %s; transformers loads it but runs another model, silently: %s", directory,
                       "; ".join(otherwise))  # fmt: skip


def _write_weights(state_dict: dict[str, torch.Tensor], path: Path, safe_serialization: bool) -> None:
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state_dict, str(path), metadata={"format": "pt"})
    else:
        torch.save(state_dict, path)


def _remove_stale_weights(directory: Path, keep: str) -> None:
    """Weights of the other format, or shards, left by an earlier save would be read instead of the new file
    (safetensors comes first) or beside it: remove them, as transformers does."""
    for name in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX):
        if name == keep or not (directory / name).is_file():
            continue
        if name.endswith(".index.json"):
            for shard in _indexed_shards_if_readable(directory / name):
                if shard != keep:
                    (directory / shard).unlink(missing_ok=True)
        (directory / name).unlink(missing_ok=True)


def _indexed_shards_if_readable(index: Path) -> list[str]:
    try:
        return [shard.name for shard in _shard_files(index)]
    except CheckpointError:  # an index that cannot be read names nothing that is safe to delete
        return []
