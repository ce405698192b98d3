"""Checkpoints in transformers' format: find them, read them safely, check every key, write them back.

Reading never runs code from a checkpoint: safetensors first, and a pickle (.bin) only through
torch.load(weights_only=True). A checkpoint whose keys do not fit the model is refused with the keys named;
nothing is silently left at its random initialisation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, CvtConfig

logger = logging.getLogger("cvt_fast")

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# BatchNorm's step counter: not a weight, absent from some checkpoints, and unused in eval.
OPTIONAL_SUFFIXES = (".num_batches_tracked",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped keys, or no weights file."""


# ---- finding a checkpoint -----------------------------------------------------------------------------------


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, allow_patterns: list[str] | None = None, **hub_kwargs):
    """A local directory as is; anything else is taken as a Hugging Face Hub id and fetched through
    huggingface_hub (an optional dependency)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or not name:
        raise FileNotFoundError(f"{name!r} is not a checkpoint directory (expected a save_pretrained folder)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError(
            f"{name!r} is not a local directory, so it would be fetched from the Hugging Face Hub, which needs the "
            "optional package huggingface_hub: pip install huggingface_hub (or pass a local directory)"
        ) from error
    patterns = allow_patterns or ["*.json", "*.safetensors", "*.bin"]
    return Path(snapshot_download(repo_id=name, allow_patterns=patterns, **hub_kwargs))


def weight_files(directory: Path) -> list[Path]:
    """The weights files of a checkpoint directory, safetensors preferred over pickles."""
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{directory / index} names shards that are not there: {missing}")
            return [directory / s for s in shards]
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict.update(load_file(str(file), device="cpu"))
        else:  # read into memory, not mmap: the model must not depend on a file save_pretrained may overwrite
            state_dict.update(torch.load(file, map_location="cpu", weights_only=True))
    return state_dict


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

    dtype (or torch_dtype): float32 by default, as transformers; "auto" keeps the checkpoint's dtype.
    config_overrides: config attributes to change, e.g. num_labels=10 for a new head (with
        ignore_mismatched_sizes=True, which re-initialises the keys whose shapes changed, with a warning).
    strict=False: initialise missing keys instead of refusing them, with a warning that names them.
    """
    hub_kwargs = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir, token=token).items() if v is not None}
    if local_files_only:
        hub_kwargs["local_files_only"] = True
    directory = resolve_checkpoint_dir(name_or_path, **hub_kwargs)
    if config is None:
        if not (directory / CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory} has no {CONFIG_NAME}; pass config= to load its weights anyway")
        config = CvtConfig.from_json_file(directory / CONFIG_NAME)
    else:
        config = config.copy()
    unknown = [key for key in config_overrides if not hasattr(config, key)]
    if unknown:
        raise TypeError(f"from_pretrained got unexpected arguments {unknown} (not CvtConfig attributes either)")
    config.update(**config_overrides)

    state_dict = read_state_dict(weight_files(directory))
    with torch.device("meta"):  # no time spent initialising weights that are about to be replaced
        model = model_class(config, backend=backend)
    state_dict = adapt_prefix(state_dict, model)
    missing, unexpected, mismatched = compare_keys(model, state_dict)

    problems = []
    if mismatched and not ignore_mismatched_sizes:
        listing = _listing([f"{k}: checkpoint {a}, model {b}" for k, a, b in mismatched])
        problems.append(f"mis-shaped keys ({listing}); pass ignore_mismatched_sizes=True to re-initialise them")
    if missing and strict:
        problems.append(f"missing keys ({_listing(missing)}); pass strict=False to initialise them")
    if unexpected and strict:
        problems.append(f"unexpected keys ({_listing(unexpected)}); pass strict=False to ignore them")
    if problems:
        raise CheckpointError(f"checkpoint {name_or_path} does not fit {model_class.__name__}: " + "; ".join(problems))
    reinitialised = [k for k, _, _ in mismatched] + missing
    if reinitialised:
        logger.warning("cvt_fast: newly initialised (not in the checkpoint): %s", _listing(reinitialised))
    if unexpected:
        logger.warning("cvt_fast: ignored checkpoint keys: %s", _listing(unexpected))
    for key in [k for k, _, _ in mismatched] + unexpected:
        state_dict.pop(key)

    model.load_state_dict(state_dict, strict=False, assign=True)
    _materialise_leftovers(model)
    target = _resolve_dtype(dtype if dtype is not None else torch_dtype, config)
    model.to(device=device, dtype=target)
    model.eval()  # as transformers: a loaded model starts in inference mode
    return model


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


def _resolve_dtype(dtype, config: CvtConfig) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        name = config.extra.get("dtype") or "float32"
        return getattr(torch, str(name).removeprefix("torch."))
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype")
        return resolved
    return dtype


def save_pretrained(model, directory: str | os.PathLike, safe_serialization: bool = True) -> None:
    """config.json + model.safetensors with transformers' keys and metadata, so transformers loads it back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.copy()
    config.extra["architectures"] = [type(model).__name__]
    config.extra["dtype"] = str(model.dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state_dict, str(directory / SAFE_WEIGHTS), metadata={"format": "pt"})
    else:
        torch.save(state_dict, directory / BIN_WEIGHTS)
