"""Checkpoints of the original CvT (microsoft/CvT): its .pth files and YAML specs, loaded as cvt_fast models that run
the original's numerics (QuickGELU, stochastic depth on the branches at per-layer rates).

Each key of the original layout (stage0.patch_embed.proj.weight, stage2.blocks.3.attn.conv_proj_q.conv.weight,
stage2.cls_token, norm, head) has one place in cvt_fast's (transformers') names: _TEMPLATES below, read both ways.
Read like every other checkpoint: torch.load(weights_only=True), tensors only, never code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, CvtConfig, preset_named
from .errors import CheckpointError, ConfigError, MissingDependencyError, describe_value
from .loading import _check_tensors, _listing, _read_pickle, adapt_prefix, compare_keys

# The original's per-stage spec fields (MODEL.SPEC in its YAML files) and the config fields they fill.
SPEC_FIELDS = {
    "PATCH_SIZE": "patch_sizes",
    "PATCH_STRIDE": "patch_stride",
    "PATCH_PADDING": "patch_padding",
    "DIM_EMBED": "embed_dim",
    "NUM_HEADS": "num_heads",
    "DEPTH": "depth",
    "MLP_RATIO": "mlp_ratio",
    "ATTN_DROP_RATE": "attention_drop_rate",
    "DROP_RATE": "drop_rate",
    "DROP_PATH_RATE": "drop_path_rate",
    "QKV_BIAS": "qkv_bias",
    "CLS_TOKEN": "cls_token",
    "QKV_PROJ_METHOD": "qkv_projection_method",
    "KERNEL_QKV": "kernel_qkv",
    "PADDING_KV": "padding_kv",
    "STRIDE_KV": "stride_kv",
    "PADDING_Q": "padding_q",
    "STRIDE_Q": "stride_q",
}
# Spec fields that change nothing in a loaded model (INIT: how the original initialised its weights).
IGNORED_SPEC_FIELDS = ("NUM_STAGES", "POS_EMBED", "INIT")
ORIGINAL_NUMERICS = {"hidden_act": "quick_gelu", "stochastic_depth": "original"}


# ---- the spec -----------------------------------------------------------------------------------------------


def config_from_spec(spec: str | os.PathLike | dict, **overrides: Any) -> CvtConfig:
    """A CvtConfig with the original's numerics from a YAML spec file (experiments/.../cvt-13-224x224.yaml), its
    MODEL.SPEC dict (or the whole parsed YAML), or a preset name (cvt-13, cvt-13-384, cvt-21, cvt-21-384, cvt-w24,
    cvt-w24-384). `overrides` are config fields (num_labels, say)."""
    preset = _preset(spec)
    if preset is not None:
        return preset.config(**{**ORIGINAL_NUMERICS, **overrides})  # an override (hidden_act) wins, as below
    where = "the spec"
    if isinstance(spec, (str, os.PathLike)):
        where, spec = str(spec), _read_yaml(Path(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping of the original's spec fields, got {describe_value(spec)}")
    model = spec.get("MODEL") if isinstance(spec.get("MODEL"), dict) else None
    fields = model.get("SPEC") if model is not None else spec
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: MODEL.SPEC is {describe_value(fields)}, expected a mapping of spec fields")
    prefix = "MODEL.SPEC." if model is not None else ""
    unknown = [k for k in fields if k not in SPEC_FIELDS and k not in IGNORED_SPEC_FIELDS]
    if unknown:
        raise ConfigError(f"{where}: {prefix}{unknown[0]} is not a field of the original CvT's spec "
                          f"(fields: {', '.join([*SPEC_FIELDS, *IGNORED_SPEC_FIELDS])})")  # fmt: skip
    missing = [k for k in SPEC_FIELDS if k not in fields]
    if missing:
        raise ConfigError(f"{where}: {prefix}{missing[0]} is missing (the spec needs {', '.join(SPEC_FIELDS)})")
    stages = fields.get("NUM_STAGES", len(fields["DEPTH"]) if isinstance(fields["DEPTH"], list) else None)
    for name in SPEC_FIELDS:
        value = fields[name]
        if not isinstance(value, list) or len(value) != stages:
            raise ConfigError(f"{where}: {prefix}{name} is {describe_value(value)}, expected a list of one entry "
                              f"per stage ({prefix}NUM_STAGES {stages})")  # fmt: skip
    if any(fields.get("POS_EMBED") or []):
        raise ConfigError(f"{where}: {prefix}POS_EMBED {fields['POS_EMBED']}: position embeddings are not part of CvT "
                          "as released (every published spec has them off), and cvt_fast has none")  # fmt: skip
    kwargs: dict[str, Any] = {config_name: list(fields[name]) for name, config_name in SPEC_FIELDS.items()}
    if model is not None and "NUM_CLASSES" in model:
        kwargs["num_labels"] = model["NUM_CLASSES"]
    try:
        return CvtConfig(**{**kwargs, **ORIGINAL_NUMERICS, **overrides})
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def spec_image_size(spec: str | os.PathLike | dict) -> int | None:
    """The image size the spec's model was evaluated at: a preset's, or the YAML's TEST.IMAGE_SIZE (else
    TRAIN.IMAGE_SIZE); None where the spec does not say."""
    preset = _preset(spec)
    if preset is not None:
        return preset.image_size
    if isinstance(spec, (str, os.PathLike)):
        spec = _read_yaml(Path(spec))
    for section in ("TEST", "TRAIN"):
        size = spec.get(section, {}).get("IMAGE_SIZE") if isinstance(spec.get(section), dict) else None
        if isinstance(size, list) and size and isinstance(size[0], int):
            return size[0]
    return None


def _preset(spec: str | os.PathLike | dict):
    """The preset a spec names; None for a dict, another name, or a file that happens to bear a preset's name."""
    return preset_named(spec) if isinstance(spec, (str, os.PathLike)) else None


def _read_yaml(path: Path) -> Any:
    if not path.exists():  # most often a preset's name mistyped: say so before asking for PyYAML or reading it
        raise ConfigError(f"{path}: neither a file nor a preset; expected a YAML spec file or one of the presets "
                          f"{', '.join(PRESETS)}")  # fmt: skip
    try:
        import yaml
    except ImportError:
        raise MissingDependencyError(
            f"reading the spec {path} needs PyYAML: pip install pyyaml (or name a preset such as cvt-13)"
        ) from None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None


# ---- the weights --------------------------------------------------------------------------------------------


def read_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in an original .pth: the model's own (final_state.pth), or under "state_dict" / "model" in a
    training checkpoint; DataParallel's "module." prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected an original CvT .pth checkpoint)")
    data = _read_pickle(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    _check_tensors(path, data)
    if data and all(key.startswith("module.") for key in data):
        data = {key.removeprefix("module."): value for key, value in data.items()}
    return data


# A transformers checkpoint's keys (CvtForImageClassification's or CvtModel's), told apart from the original's.
TRANSFORMERS_PREFIXES = ("cvt.encoder.", "encoder.stages.", "classifier.", "layernorm.")


def _check_spec_shape(checkpoint, state: dict[str, torch.Tensor], config) -> None:
    """The spec's DEPTH and DIM_EMBED against what the checkpoint holds, stage by stage: a checkpoint with another
    spec (cvt-21's with cvt-13's, say) is refused by name rather than by a list of keys."""
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"stage(\d+)\.", k))})
    depth = tuple(
        1 + max((int(m.group(1)) for k in state if (m := re.match(rf"stage{s}\.blocks\.(\d+)\.", k))), default=-1)
        for s in stages
    )
    widths = tuple(
        int(state[f"stage{s}.patch_embed.proj.weight"].shape[0]) if f"stage{s}.patch_embed.proj.weight" in state
        else None for s in stages
    )  # fmt: skip
    spec_depth = tuple(config.depth[: config.num_stages])
    spec_widths = tuple(config.embed_dim[: config.num_stages])
    if depth != spec_depth:
        raise CheckpointError(f"{checkpoint}: the spec's DEPTH {spec_depth} does not match the checkpoint's {depth}; "
                              "give the spec it was trained with")  # fmt: skip
    if None not in widths and widths != spec_widths:
        raise CheckpointError(f"{checkpoint}: the spec's DIM_EMBED {spec_widths} does not match the checkpoint's "
                              f"{widths}; give the spec it was trained with")  # fmt: skip


_STAGE = "cvt.encoder.stages.{s}"
_LAYER = _STAGE + ".layers.{j}"
# (original, cvt_fast) key templates: {s} a stage, {j} a layer, {w} the parameter or buffer name.
_TEMPLATES = [
    ("norm.{w}", "layernorm.{w}"),
    ("head.{w}", "classifier.{w}"),
    ("stage{s}.cls_token", _STAGE + ".cls_token"),
    ("stage{s}.patch_embed.proj.{w}", _STAGE + ".embedding.convolution_embeddings.projection.{w}"),
    ("stage{s}.patch_embed.norm.{w}", _STAGE + ".embedding.convolution_embeddings.normalization.{w}"),
    ("stage{s}.blocks.{j}.norm1.{w}", _LAYER + ".layernorm_before.{w}"),
    ("stage{s}.blocks.{j}.norm2.{w}", _LAYER + ".layernorm_after.{w}"),
    ("stage{s}.blocks.{j}.attn.proj.{w}", _LAYER + ".attention.output.dense.{w}"),
    ("stage{s}.blocks.{j}.mlp.fc1.{w}", _LAYER + ".intermediate.dense.{w}"),
    ("stage{s}.blocks.{j}.mlp.fc2.{w}", _LAYER + ".output.dense.{w}"),
]
for _short, _long in (("q", "query"), ("k", "key"), ("v", "value")):
    _projection = _LAYER + f".attention.attention.convolution_projection_{_long}.convolution_projection"
    _TEMPLATES += [
        (
            f"stage{{s}}.blocks.{{j}}.attn.proj_{_short}.{{w}}",
            _LAYER + f".attention.attention.projection_{_long}.{{w}}",
        ),
        (f"stage{{s}}.blocks.{{j}}.attn.conv_proj_{_short}.conv.{{w}}", _projection + ".convolution.{w}"),
        (f"stage{{s}}.blocks.{{j}}.attn.conv_proj_{_short}.bn.{{w}}", _projection + ".normalization.{w}"),
    ]


def _pattern(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{s\}", r"(?P<s>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(pattern.replace(r"\{w\}", r"(?P<w>\w+)"))


_RULES = [(_pattern(original), _pattern(ours), original, ours) for original, ours in _TEMPLATES]


def original_key(key: str) -> str | None:
    """The cvt_fast (transformers) name of an original key, or None where the original layout has no such key."""
    for pattern, _, _, ours in _RULES:
        match = pattern.fullmatch(key)
        if match:
            return ours.format(**match.groupdict())
    return None


def key_in_original(key: str) -> str:
    """The original name of a cvt_fast key (the key itself where the original has none): for messages."""
    for _, pattern, original, _ in _RULES:
        match = pattern.fullmatch(key)
        if match:
            return original.format(**match.groupdict())
    return key


def load_original(model_class, checkpoint: str | os.PathLike, spec, **kwargs: Any):
    """`model_class` (CvtForImageClassification or CvtModel) from an original checkpoint and its spec, with the
    original's numerics: every key mapped and shaped as the spec says, nothing left over (a backbone leaves out the
    classifier's norm and head)."""
    state = read_original_checkpoint(checkpoint)
    backend = kwargs.pop("backend", None)
    if "head.weight" in state and "num_labels" not in kwargs:
        kwargs["num_labels"] = state["head.weight"].shape[0]
    config = config_from_spec(spec, **kwargs)
    mapped = {original_key(k): v for k, v in state.items()}  # in CvtForImageClassification's names
    unknown = [k for k in state if original_key(k) is None]
    if len(unknown) == len(state):
        if state and all(k.startswith(TRANSFORMERS_PREFIXES) for k in state):
            raise CheckpointError(
                f"{checkpoint}: already a transformers CvT checkpoint (its keys are transformers' names, "
                f"{_listing(list(state), 2)}): load its folder with from_pretrained, no conversion needed"
            )
        raise CheckpointError(
            f"{checkpoint}: not an original CvT checkpoint: none of its {len(state)} keys is in microsoft/CvT's "
            f"layout (stage0.patch_embed.proj.weight, ...); it has {_listing(list(state), 4)}"
        )
    if unknown:
        raise CheckpointError(f"{checkpoint}: keys outside the original CvT's layout: {_listing(unknown)}")
    if not any(k.startswith("stage") for k in state):  # adapt_prefix would take norm and head alone for a backbone's
        raise CheckpointError(f"{checkpoint} lacks what the spec needs: every stage; it has only "
                              f"{_listing(list(state))}")  # fmt: skip
    _check_spec_shape(checkpoint, state, config)
    model = model_class(config, backend=backend)
    mapped = adapt_prefix(mapped, model)  # a backbone (CvtModel): its keys lack the prefix, and it has no norm or head
    missing, extra, wrong = compare_keys(model, mapped)
    # key_in_original reads CvtForImageClassification's names; a backbone's lack its base model's prefix.
    prefix = "" if hasattr(model, model.base_model_prefix) else model.base_model_prefix + "."
    if wrong:
        shapes = [f"{key_in_original(prefix + k)} is {ours}, the spec makes it {needed}" for k, ours, needed in wrong]
        raise CheckpointError(f"{checkpoint} does not fit the spec: {_listing(shapes, 4)}")
    if extra:
        extra = [key_in_original(prefix + k) for k in extra]
        raise CheckpointError(f"{checkpoint} has what the spec has no place for: {_listing(extra)}")
    if missing:
        missing = [key_in_original(prefix + k) for k in missing]
        raise CheckpointError(f"{checkpoint} lacks what the spec needs: {_listing(missing)}")
    with torch.no_grad():
        model.load_state_dict(mapped, strict=False)  # strict but for the optional step counters, checked above
    return model.eval()
