"""Where a checkpoint name leads: a local save_pretrained folder as it is, anything that could be a Hugging Face Hub
id fetched through huggingface_hub (an optional dependency)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointNotFoundError, MissingDependencyError, one_line


def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike, allow_patterns: list[str] | None = None, **hub_kwargs
) -> Path:
    """A local directory as is; anything else that could be a Hub id is fetched into the Hub's cache."""
    name = os.fspath(name_or_path)
    if not name.strip():  # Path("") is the working directory, which is never what an empty name meant
        raise CheckpointNotFoundError("an empty name is not a checkpoint (expected a save_pretrained folder or hub id)")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(
            f"{name!r} is a file, not a checkpoint directory (expected a save_pretrained folder)"
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise CheckpointNotFoundError(f"{name!r} is not a checkpoint directory: there is no such folder")
    return _download(name, allow_patterns or ["*.json", "*.safetensors", "*.bin"], hub_kwargs)


def _download(repo_id: str, allow_patterns: list[str], hub_kwargs: dict) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise MissingDependencyError(
            f"{repo_id!r} is not a local directory, so it would be fetched from the Hugging Face Hub, which needs the "
            "optional package huggingface_hub: pip install huggingface_hub (or pass a local directory)"
        ) from error
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=allow_patterns, **hub_kwargs))
    except Exception as error:  # whatever the Hub or the network answered, the name reached no checkpoint
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a checkpoint directory (there is no folder {Path(repo_id).absolute()}) and could not "
            f"be fetched from the Hugging Face Hub either ({one_line(error)})"
        ) from error
