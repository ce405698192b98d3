"""CvtConfig: transformers' CvT configuration, read and written in the same config.json format.

Every parameter of transformers' `CvtConfig` is accepted under the same name and default; keys this class does
not know (architectures, dtype, transformers_version, ...) are kept and written back, so a config.json survives a
round trip through cvt_fast unchanged in meaning.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class CvtConfig:
    model_type = "cvt"

    def __init__(
        self,
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
        num_labels: int | None = None,
        id2label: dict | None = None,
        label2id: dict | None = None,
        problem_type: str | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        self.num_channels = num_channels
        self.patch_sizes = list(patch_sizes)
        self.patch_stride = list(patch_stride)
        self.patch_padding = list(patch_padding)
        self.embed_dim = list(embed_dim)
        self.num_heads = list(num_heads)
        self.depth = list(depth)
        self.mlp_ratio = list(mlp_ratio)
        self.attention_drop_rate = list(attention_drop_rate)
        self.drop_rate = list(drop_rate)
        self.drop_path_rate = list(drop_path_rate)
        self.qkv_bias = list(qkv_bias)
        self.cls_token = list(cls_token)
        self.qkv_projection_method = list(qkv_projection_method)
        self.kernel_qkv = list(kernel_qkv)
        self.padding_kv = list(padding_kv)
        self.stride_kv = list(stride_kv)
        self.padding_q = list(padding_q)
        self.stride_q = list(stride_q)
        self.initializer_range = initializer_range
        # Kept for config.json fidelity only: transformers' CvT builds every LayerNorm with the default eps 1e-5
        # and never reads this value, and cvt_fast does the same to give the same numbers.
        self.layer_norm_eps = layer_norm_eps
        self.problem_type = problem_type
        self.output_hidden_states = output_hidden_states
        self.return_dict = return_dict

        if id2label is not None:
            self.id2label = {int(k): v for k, v in id2label.items()}
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        if num_labels is not None and num_labels != len(self.id2label):
            raise ValueError(f"num_labels={num_labels} disagrees with id2label, which has {len(self.id2label)} labels")
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
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def num_stages(self) -> int:
        return len(self.depth)

    @property
    def total_stride(self) -> int:
        """Pixels per token side in the last stage: the product of the patch-embedding strides."""
        stride = 1
        for s in self.patch_stride[: self.num_stages]:
            stride *= s
        return stride

    # ---- validation ---------------------------------------------------------------------------------------

    def validate(self) -> None:
        stages = len(self.depth)
        if stages == 0:
            raise ValueError("CvtConfig needs at least one stage: depth is empty")
        # transformers only ever indexes these lists by stage, so longer lists (a 2-stage model keeping the
        # 3-entry defaults) are accepted there and here; shorter ones cannot work.
        short = [
            f"{name} has {len(getattr(self, name))}" for name in STAGE_PARAMETERS if len(getattr(self, name)) < stages
        ]
        if short:
            raise ValueError(f"every per-stage parameter needs {stages} entries (len(depth)); " + ", ".join(short))
        for stage in range(stages):
            dim, heads = self.embed_dim[stage], self.num_heads[stage]
            if heads < 1 or dim % heads:
                raise ValueError(f"stage {stage}: embed_dim {dim} is not divisible by num_heads {heads}")
            if self.depth[stage] < 1:
                raise ValueError(f"stage {stage}: depth must be at least 1, got {self.depth[stage]}")
            method = self.qkv_projection_method[stage]
            if method not in PROJECTION_METHODS:
                raise ValueError(f"stage {stage}: qkv_projection_method {method!r} is not one of {PROJECTION_METHODS}")
            kernel, stride_q, padding_q = self.kernel_qkv[stage], self.stride_q[stage], self.padding_q[stage]
            if method == "dw_bn" and (stride_q != 1 or 2 * padding_q != kernel - 1):
                # The residual adds the attention output to its input: the query grid must keep the input's size.
                raise ValueError(
                    f"stage {stage}: the query projection must keep the token grid's size (stride_q 1 and "
                    f"padding_q (kernel_qkv - 1) / 2 = {(kernel - 1) / 2:g}), got stride_q {stride_q}, "
                    f"padding_q {padding_q}, kernel_qkv {kernel}"
                )
            for name in ("patch_sizes", "patch_stride", "kernel_qkv", "stride_kv", "stride_q"):
                if getattr(self, name)[stage] < 1:
                    raise ValueError(f"stage {stage}: {name} must be at least 1, got {getattr(self, name)[stage]}")
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be at least 1, got {self.num_channels}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is not one of {PROBLEM_TYPES} (or None)")

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
        if self.problem_type is not None:
            out["problem_type"] = self.problem_type
        if self.output_hidden_states:
            out["output_hidden_states"] = True
        if not self.return_dict:
            out["return_dict"] = False
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> CvtConfig:
        """Build from a config.json dict, then apply `overrides` as attribute assignments, as transformers does (so
        num_labels=10 replaces a checkpoint's 1000 labels instead of contradicting them)."""
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"this is a config for model_type {model_type!r}, not a CvT ('cvt') config")
        config = cls(**data)
        config.update(**overrides)
        return config

    def update(self, **values: Any) -> None:
        """Set attributes (keys this class does not know are kept with the rest of config.json), then validate."""
        for key, value in values.items():
            if key in self.__dict__ or key == "num_labels":
                setattr(self, key, list(value) if key in STAGE_PARAMETERS else value)
            else:
                self.extra[key] = value
        self.validate()

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> CvtConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / CONFIG_NAME).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> CvtConfig:
        """Read config.json from a directory, a config file, a preset name ("cvt-13") or a hub id."""
        if str(name_or_path) in PRESETS:
            return PRESETS[str(name_or_path)].config(**overrides)
        path = Path(name_or_path)
        if path.is_file():
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), **overrides)
        from .loading import resolve_checkpoint_dir

        directory = resolve_checkpoint_dir(name_or_path, allow_patterns=[CONFIG_NAME])
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
        return cls.from_dict(json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")), **overrides)

    def copy(self) -> CvtConfig:
        return copy.deepcopy(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CvtConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CvtConfig {self.to_json_string()}"


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


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]
