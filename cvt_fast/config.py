"""CvtConfig: transformers' CvT configuration, read and written in the same config.json format.

Every parameter of transformers' `CvtConfig` is accepted under the same name and default; keys this class does
not know (architectures, dtype, transformers_version, ...) are kept and written back, so a config.json survives a
round trip through cvt_fast unchanged in meaning.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointNotFoundError, ConfigError, describe_value
from .files import read_json_object, replacing
from .hub import resolve_checkpoint_dir

CONFIG_NAME = "config.json"

# The per-stage parameters: one entry per stage, all lists of the same length.
STAGE_PARAMETERS = (
    "patch_sizes",
    "patch_stride",
    "patch_padding",
    "embed_dim",
    "num_heads",
    "depth",
    "mlp_ratio",
    "attention_drop_rate",
    "drop_rate",
    "drop_path_rate",
    "qkv_bias",
    "cls_token",
    "qkv_projection_method",
    "kernel_qkv",
    "padding_kv",
    "stride_kv",
    "padding_q",
    "stride_q",
)

# "dw_bn": depthwise conv + BatchNorm (every released checkpoint). "avg": average pooling for keys and values,
# identity for queries (the original CvT; transformers crashes on it). "linear": identity for all three.
PROJECTION_METHODS = ("dw_bn", "avg", "linear")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# CvT as transformers runs it (the defaults, for parity) or as its authors trained it (microsoft/CvT). Neither field
# is transformers': it keeps them in config.json and runs exact GELU and its own stochastic depth whatever they say.
HIDDEN_ACTS = ("gelu", "quick_gelu")  # exact GELU; x * sigmoid(1.702 x), the original's
# "transformers": one drop-path rate per stage (the stage-index-th of linspace(0, rate, depth)), applied to the sum
# after the MLP's residual add, so a dropped sample loses its whole hidden state. "original": layer j of a stage
# takes the j-th rate, applied to the attention and MLP branches only.
STOCHASTIC_DEPTHS = ("transformers", "original")

# The smallest value each integer per-stage parameter takes (paddings may be 0; sizes, strides and counts not).
STAGE_INTEGER_MINIMUM = {
    "patch_sizes": 1,
    "patch_stride": 1,
    "patch_padding": 0,
    "embed_dim": 1,
    "num_heads": 1,
    "depth": 1,
    "kernel_qkv": 1,
    "padding_kv": 0,
    "stride_kv": 1,
    "padding_q": 0,
    "stride_q": 1,
}
# Probabilities: a dropout may drop everything (p = 1, as torch and transformers allow), but a stochastic-depth rate
# of 1 divides by its keep probability, 0, and turns training outputs into NaN.
STAGE_RATES = {"attention_drop_rate": {"at_most": 1.0}, "drop_rate": {"at_most": 1.0}, "drop_path_rate": {"below": 1.0}}
STAGE_FLAGS = ("qkv_bias", "cls_token")


class CvtConfig:
    model_type = "cvt"

    def __init__(
        self,
        /,  # so that a config.json key named "self" lands in **kwargs instead of clashing with the instance
        num_channels: int = 3,
        patch_sizes=(7, 3, 3),
        patch_stride=(4, 2, 2),
        patch_padding=(2, 1, 1),
        embed_dim=(64, 192, 384),
        num_heads=(1, 3, 6),
        depth=(1, 2, 10),
        mlp_ratio=(4.0, 4.0, 4.0),
        attention_drop_rate=(0.0, 0.0, 0.0),
        drop_rate=(0.0, 0.0, 0.0),
        drop_path_rate=(0.0, 0.0, 0.1),
        qkv_bias=(True, True, True),
        cls_token=(False, False, True),
        qkv_projection_method=("dw_bn", "dw_bn", "dw_bn"),
        kernel_qkv=(3, 3, 3),
        padding_kv=(1, 1, 1),
        stride_kv=(2, 2, 2),
        padding_q=(1, 1, 1),
        stride_q=(1, 1, 1),
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        hidden_act: str = "gelu",
        stochastic_depth: str = "transformers",
        num_labels: int | None = None,
        id2label: dict | None = None,
        label2id: dict | None = None,
        problem_type: str | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs: Any,
    ):
        self.num_channels = num_channels
        arguments = locals()  # the per-stage arguments, by name, as the signature above gives them
        for name in STAGE_PARAMETERS:
            setattr(self, name, _stage_list(name, arguments[name]))
        self.initializer_range = initializer_range
        # Kept for config.json fidelity only: transformers' CvT builds every LayerNorm with the default eps 1e-5
        # and never reads this value, and cvt_fast does the same to give the same numbers.
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.stochastic_depth = stochastic_depth
        self.problem_type = problem_type
        self.output_hidden_states = output_hidden_states
        self.return_dict = return_dict
        # Which stages CvtBackbone returns, as transformers' backbones take them: names from stage_names
        # ("stage1".."stageN"; CvT has no stem), or their indices; either aligns the other. None: the last stage.
        self.out_features = list(out_features) if isinstance(out_features, tuple) else out_features
        self.out_indices = list(out_indices) if isinstance(out_indices, tuple) else out_indices

        if id2label is not None:
            self.id2label = _label_names(id2label)
        else:
            self.id2label = _default_labels(2 if num_labels is None else num_labels)
        if num_labels is not None and num_labels != len(self.id2label):
            raise ConfigError(f"num_labels={num_labels} disagrees with id2label, which has {len(self.id2label)} labels")
        if label2id is not None and not isinstance(label2id, dict):
            raise ConfigError(f"label2id must be a dict of label names to indices, got {describe_value(label2id)}")
        self.label2id = dict(label2id) if label2id is not None else {v: k for k, v in self.id2label.items()}

        # Keys without a meaning here (architectures, dtype, transformers_version, ...) are kept verbatim.
        self.extra = {k: v for k, v in kwargs.items() if k not in ("model_type", "torch_dtype")}
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            self.extra["dtype"] = kwargs["torch_dtype"]
        self.validate()

    # ---- labels -------------------------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if value != len(self.id2label):
            self.id2label = _default_labels(value)
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def num_stages(self) -> int:
        return len(self.depth)

    @property
    def stage_names(self) -> list[str]:
        return [f"stage{i + 1}" for i in range(self.num_stages)]

    def backbone_stages(self) -> tuple[list[str], list[int]]:
        """(out_features, out_indices) aligned with each other: what CvtBackbone returns (default: the last
        stage). Negative indices count from the end, as in transformers."""
        names = self.stage_names
        if self.out_features is not None:
            return list(self.out_features), [names.index(name) for name in self.out_features]
        if self.out_indices is not None:
            indices = [i % len(names) for i in self.out_indices]
            return [names[i] for i in indices], indices
        return [names[-1]], [len(names) - 1]

    def stage_strides(self) -> list[int]:
        """Pixels per token side at each stage's output: the running product of the patch-embedding strides."""
        strides, stride = [], 1
        for s in self.patch_stride[: self.num_stages]:
            stride *= s
            strides.append(stride)
        return strides

    @property
    def total_stride(self) -> int:
        """Pixels per token side in the last stage: the product of the patch-embedding strides."""
        stride = 1
        for s in self.patch_stride[: self.num_stages]:
            stride *= s
        return stride

    # ---- validation ---------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Refuse, with the field named, any value that transformers would refuse or crash on (or that would train
        into NaN). Checked in order: types, then ranges, then how fields combine."""
        stages = self._check_stage_count()
        for stage in range(stages):
            self._check_stage(stage)
        check_integer("num_channels", self.num_channels, 1)
        check_number("initializer_range", self.initializer_range, above=0.0)  # the std of the initial weights
        # Only its type: transformers' CvT never reads layer_norm_eps (every LayerNorm uses 1e-5), so any number
        # it holds is kept for config.json and harms nothing.
        check_number("layer_norm_eps", self.layer_norm_eps)
        for name, choices in (("hidden_act", HIDDEN_ACTS), ("stochastic_depth", STOCHASTIC_DEPTHS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} {describe_value(getattr(self, name))} is not one of {choices}")
        if not isinstance(self.id2label, dict) or not all(_is_integer(key) for key in self.id2label):
            raise ConfigError(
                f"id2label must be a dict of class indices to label names, got {describe_value(self.id2label)}"
            )
        if not isinstance(self.label2id, dict):
            raise ConfigError(f"label2id must be a dict of label names to indices, got {describe_value(self.label2id)}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type {self.problem_type!r} is not one of {PROBLEM_TYPES} (or None)")
        for name in ("output_hidden_states", "return_dict"):
            if getattr(self, name) not in (True, False):  # 0 and 1 pass too, as transformers takes them
                raise ConfigError(f"{name} must be true or false, got {describe_value(getattr(self, name))}")
        self._check_backbone_stages()

    def _check_backbone_stages(self) -> None:
        """transformers' rules for a backbone's out_features / out_indices, with the same messages' content."""
        names, features, indices = self.stage_names, self.out_features, self.out_indices
        if features is not None:
            if not isinstance(features, list) or not all(isinstance(f, str) for f in features) or not features:
                raise ConfigError(
                    f"out_features must be a non-empty list of stage names, got {describe_value(features)}"
                )
            unknown = [f for f in features if f not in names]
            if unknown:
                raise ConfigError(f"out_features {features}: {unknown} are not stages; the stages are {names}")
            if len(set(features)) != len(features):
                raise ConfigError(f"out_features must not contain duplicates, got {features}")
            if features != [n for n in names if n in features]:
                raise ConfigError(f"out_features must follow the stages' order {names}, got {features}")
        if indices is not None:
            if not isinstance(indices, list) or not all(_is_integer(i) for i in indices) or not indices:
                raise ConfigError(
                    f"out_indices must be a non-empty list of stage indices, got {describe_value(indices)}"
                )
            if any(not -len(names) <= i < len(names) for i in indices):
                raise ConfigError(f"out_indices {indices}: each must index one of the {len(names)} stages {names}")
            positive = [i % len(names) for i in indices]
            if len(set(positive)) != len(positive):
                raise ConfigError(f"out_indices must not contain duplicates, got {indices} (stages {positive})")
            if positive != sorted(positive):
                raise ConfigError(f"out_indices must follow the stages' order, got {indices} (stages {positive})")
        if features is not None and indices is not None:
            if features != [names[i % len(names)] for i in indices]:
                raise ConfigError(
                    f"out_features {features} and out_indices {indices} name different stages; give one of them"
                )

    def _check_stage_count(self) -> int:
        for name in STAGE_PARAMETERS:  # also after attribute assignment, which bypasses _stage_list
            _stage_list(name, getattr(self, name))
        stages = len(self.depth)
        if stages == 0:
            raise ConfigError("CvtConfig needs at least one stage: depth is empty")
        # transformers only ever indexes these lists by stage, so longer lists (a 2-stage model keeping the
        # 3-entry defaults) are accepted there and here, and their extra entries are never read; shorter ones
        # cannot work.
        short = [
            f"{name} has {len(getattr(self, name))}" for name in STAGE_PARAMETERS if len(getattr(self, name)) < stages
        ]
        if short:
            raise ConfigError(f"every per-stage parameter needs {stages} entries (len(depth)); " + ", ".join(short))
        return stages

    def _check_stage(self, stage: int) -> None:
        def where(name: str) -> str:
            return f"stage {stage}: {name}"

        for name, minimum in STAGE_INTEGER_MINIMUM.items():
            check_integer(where(name), getattr(self, name)[stage], minimum)
        for name, upper_bound in STAGE_RATES.items():
            check_number(where(name), getattr(self, name)[stage], at_least=0.0, **upper_bound)
        # A ratio small enough to leave int(embed_dim * mlp_ratio) = 0 hidden units still runs, in transformers too.
        check_number(where("mlp_ratio"), self.mlp_ratio[stage], at_least=0.0)
        for name in STAGE_FLAGS:
            if not isinstance(getattr(self, name)[stage], bool):
                raise ConfigError(
                    f"{where(name)} must be true or false, got {describe_value(getattr(self, name)[stage])}"
                )
        self._check_attention(stage)

    def _check_attention(self, stage: int) -> None:
        dim, heads = self.embed_dim[stage], self.num_heads[stage]
        if dim % heads:
            raise ConfigError(f"stage {stage}: embed_dim {dim} is not divisible by num_heads {heads}")
        method = self.qkv_projection_method[stage]
        if method not in PROJECTION_METHODS:
            raise ConfigError(
                f"stage {stage}: qkv_projection_method {describe_value(method)} is not one of {PROJECTION_METHODS}"
            )
        kernel, stride_q, padding_q = self.kernel_qkv[stage], self.stride_q[stage], self.padding_q[stage]
        if method == "dw_bn" and (stride_q != 1 or 2 * padding_q != kernel - 1):
            # The residual adds the attention output to its input: the query grid must keep the input's size.
            raise ConfigError(
                f"stage {stage}: the query projection must keep the token grid's size (stride_q 1 and "
                f"padding_q (kernel_qkv - 1) / 2 = {(kernel - 1) / 2:g}), got stride_q {stride_q}, "
                f"padding_q {padding_q}, kernel_qkv {kernel}"
            )
        if method == "avg" and 2 * self.padding_kv[stage] > kernel:  # torch's average pooling refuses more
            raise ConfigError(
                f"stage {stage}: padding_kv {self.padding_kv[stage]} is more than half of kernel_qkv {kernel}, "
                "which average pooling (qkv_projection_method 'avg') does not allow"
            )

    # ---- dict / JSON --------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            model_type=self.model_type,
            num_channels=self.num_channels,
            **{name: list(getattr(self, name)) for name in STAGE_PARAMETERS},
            initializer_range=self.initializer_range,
            layer_norm_eps=self.layer_norm_eps,
            id2label={str(k): v for k, v in self.id2label.items()},
            label2id=dict(self.label2id),
        )
        if self.hidden_act != "gelu":  # written only when set, so that a default config.json is transformers'
            out["hidden_act"] = self.hidden_act
        if self.stochastic_depth != "transformers":
            out["stochastic_depth"] = self.stochastic_depth
        if self.problem_type is not None:
            out["problem_type"] = self.problem_type
        if self.output_hidden_states:
            out["output_hidden_states"] = True
        if not self.return_dict:
            out["return_dict"] = False
        if self.out_features is not None or self.out_indices is not None:  # aligned, as transformers writes them
            out["out_features"], out["out_indices"] = self.backbone_stages()
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> CvtConfig:
        """Build from a config.json dict, then apply `overrides` as attribute assignments, as transformers does (so
        num_labels=10 replaces a checkpoint's 1000 labels instead of contradicting them)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a CvT config is a dict (a JSON object) of parameters, got {describe_value(data)}")
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"this is a config for model_type {model_type!r}, not a CvT ('cvt') config")
        config = cls(**data)
        config.update(**overrides)
        return config

    def update(self, **values: Any) -> None:
        """Set attributes (keys this class does not know are kept with the rest of config.json), then validate.
        A refused value leaves the config as it was."""
        candidate = self.copy()
        # Setting one of a backbone's out_features / out_indices re-aligns the other, as transformers does.
        if "out_features" in values and "out_indices" not in values:
            candidate.out_indices = None
        if "out_indices" in values and "out_features" not in values:
            candidate.out_features = None
        for key, value in values.items():
            if key in STAGE_PARAMETERS:
                value = _stage_list(key, value)
            elif key == "id2label":
                value = _label_names(value)
            if key in candidate.__dict__ or key == "num_labels":
                setattr(candidate, key, value)
            else:
                candidate.extra[key] = value
        candidate.validate()
        self.__dict__.update(candidate.__dict__)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> CvtConfig:
        """Read a config.json; a refusal names the file (and the field)."""
        data = read_json_object(path, ConfigError)
        try:
            config = cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        config.update(**overrides)
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with replacing(Path(directory) / CONFIG_NAME) as temporary:
            temporary.write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> CvtConfig:
        """Read config.json from a directory, a config file, a preset name ("cvt-13", unless a file or folder of
        that name exists) or a hub id."""
        preset = preset_named(name_or_path)
        if preset is not None:
            return preset.config(**overrides)
        path = Path(name_or_path)
        if path.is_file():
            return cls.from_json_file(path, **overrides)
        directory = resolve_checkpoint_dir(name_or_path, allow_patterns=[CONFIG_NAME])
        if not (directory / CONFIG_NAME).is_file():
            raise CheckpointNotFoundError(f"{directory} has no {CONFIG_NAME}")
        return cls.from_json_file(directory / CONFIG_NAME, **overrides)

    def copy(self) -> CvtConfig:
        return copy.deepcopy(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CvtConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CvtConfig {self.to_json_string()}"


# ---- field checks -------------------------------------------------------------------------------------------


def transformers_cannot_run(config: CvtConfig) -> list[str]:
    """What in `config` transformers' CvT cannot build or run (cvt_fast can, as the original CvT did), one line each;
    empty when transformers runs it. Said where a user could be surprised: a checkpoint saved with such a config
    loads in cvt_fast only."""
    problems = []
    shallow = [s for s in range(config.num_stages) if config.depth[s] <= s]
    if shallow:
        problems.append(
            f"depth {list(config.depth[: config.num_stages])}: stage {shallow[0]} is not deeper than its index "
            "(transformers indexes its drop-path rates by stage)"
        )
    if "avg" in config.qkv_projection_method[: config.num_stages]:
        problems.append("qkv_projection_method 'avg' (transformers builds no module for it)")
    last = config.num_stages - 1
    early = [s for s in range(last) if config.cls_token[s] and config.embed_dim[s] != config.embed_dim[last]]
    if early:
        problems.append(
            f"a cls token on stage {early[0]}, narrower than the last (transformers sizes every cls token by the last "
            "stage's embed_dim)"
        )
    return problems


def transformers_runs_otherwise(config: CvtConfig) -> list[str]:
    """What transformers, loading `config`, would silently run otherwise (it ignores these fields), one line each."""
    differences = []
    if config.hidden_act != "gelu":
        differences.append(f"hidden_act {config.hidden_act!r} (transformers runs exact GELU)")
    if config.stochastic_depth != "transformers" and any(config.drop_path_rate[: config.num_stages]):
        differences.append(
            f"stochastic_depth {config.stochastic_depth!r} (in training, transformers drops the whole hidden state "
            "after the MLP's residual add, at one rate per stage)"
        )
    return differences


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _stage_list(name: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list with one entry per stage, got {describe_value(value)}")
    return list(value)


def check_integer(name: str, value: Any, minimum: int) -> None:
    if not _is_integer(value):
        raise ConfigError(f"{name} must be an integer, got {describe_value(value)}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")


def check_number(
    name: str,
    value: Any,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> None:
    """A finite real number (an int will do), within the given bounds."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {describe_value(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if at_least is not None and value < at_least:
        raise ConfigError(f"{name} must be at least {at_least:g}, got {value}")
    if above is not None and value <= above:
        raise ConfigError(f"{name} must be above {above:g}, got {value}")
    if at_most is not None and value > at_most:
        raise ConfigError(f"{name} must be at most {at_most:g}, got {value}")
    if below is not None and value >= below:
        raise ConfigError(f"{name} must be below {below:g}, got {value}")


def _default_labels(count: Any) -> dict[int, str]:
    check_integer("num_labels", count, 0)
    return {i: f"LABEL_{i}" for i in range(count)}


def _label_names(id2label: Any) -> dict[int, Any]:
    """{index: name} from a dict whose keys are indices, as ints or (config.json) strings of ints."""
    if not isinstance(id2label, dict):
        raise ConfigError(f"id2label must be a dict of class indices to label names, got {describe_value(id2label)}")
    labels = {}
    for key, name in id2label.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"id2label keys must be class indices (integers), got {describe_value(key)}") from None
        if isinstance(name, bool) or not isinstance(name, (str, int, float)):
            raise ConfigError(f"id2label[{index}] must be a label name (a string), got {describe_value(name)}")
        labels[index] = name
    return labels


# ---- presets ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A released CvT architecture: its config (1000 ImageNet classes) and the image size it was trained at."""

    name: str
    image_size: int
    config_kwargs: tuple[tuple[str, Any], ...]

    def config(self, **overrides: Any) -> CvtConfig:
        kwargs = {"num_labels": 1000, **dict(self.config_kwargs), **overrides}
        return CvtConfig(**kwargs)


_CVT_13 = (("depth", (1, 2, 10)),)
_CVT_21 = (("depth", (1, 4, 16)),)
_CVT_W24 = (("depth", (2, 2, 20)), ("num_heads", (3, 12, 16)), ("embed_dim", (192, 768, 1024)))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("cvt-13", 224, _CVT_13),
        Preset("cvt-13-384", 384, _CVT_13),
        Preset("cvt-21", 224, _CVT_21),
        Preset("cvt-21-384", 384, _CVT_21),
        # CvT-W24 was released at 384 only; the 224 preset is the same architecture at the smaller size.
        Preset("cvt-w24", 224, _CVT_W24),
        Preset("cvt-w24-384", 384, _CVT_W24),
    )
}


def preset_named(name: str | os.PathLike) -> Preset | None:
    """The preset called `name`, unless a file or folder of that name exists: a checkpoint downloaded or saved as
    ./cvt-13 is the user's, not the preset."""
    return None if Path(name).exists() else PRESETS.get(str(name))


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]
