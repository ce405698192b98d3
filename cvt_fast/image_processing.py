"""CvtImageProcessor: the preprocessing CvT checkpoints ship with (transformers' ConvNextImageProcessor), in PIL and
numpy only.

Below 384: resize the shortest edge to size / crop_pct (bicubic), then center-crop size x size.
From 384 up: resize straight to size x size (no crop). Then rescale to [0, 1] and normalise with the ImageNet
mean and std. Every step is the same arithmetic, in the same dtypes, as transformers' PIL backend.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CONFIG_NAME, check_integer, check_number, preset_named
from .errors import CheckpointNotFoundError, ConfigError, InputError, InputTypeError, describe_value
from .files import read_json_object, replacing
from .hub import resolve_checkpoint_dir

logger = logging.getLogger("cvt_fast")

PREPROCESSOR_NAME = "preprocessor_config.json"
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value preprocessor_config.json stores
DEFAULT_PREPROCESSING = "shortest edge to 256 px, bicubic, centre crop 224, ImageNet mean and std"
RESAMPLING_FILTERS = (0, 1, 2, 3, 4, 5)  # PIL.Image.Resampling: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


class BatchFeature(dict):
    """{"pixel_values": tensor}, also readable as .pixel_values, so both `model(**inputs)` and
    `model(inputs.pixel_values)` work."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


class CvtImageProcessor:
    def __init__(
        self,
        /,  # so that a key named "self" in preprocessor_config.json lands in **unused
        size: int | dict = 224,
        crop_pct: float = 224 / 256,
        resample: int = BICUBIC,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        **unused: Any,
    ):
        self.size = _shortest_edge(size)
        self.crop_pct = crop_pct if crop_pct is not None else 224 / 256
        self.resample = resample
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = _per_channel("image_mean", image_mean)
        self.image_std = _per_channel("image_std", image_std)
        self._validate()

    def _validate(self) -> None:
        """Refuse, naming the field, values that would fail (or divide by zero) only once an image arrives."""
        check_number("crop_pct", self.crop_pct, above=0.0)
        if int(self.size / self.crop_pct) < 1:  # the shortest edge is first resized to this many pixels
            raise ConfigError(f"crop_pct {self.crop_pct} leaves size / crop_pct below one pixel (size {self.size})")
        if self.resample not in RESAMPLING_FILTERS or isinstance(self.resample, bool):
            raise ConfigError(
                f"resample must be one of PIL's filters {RESAMPLING_FILTERS}, got {describe_value(self.resample)}"
            )
        check_number("rescale_factor", self.rescale_factor)
        for name in ("do_resize", "do_rescale", "do_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {describe_value(getattr(self, name))}")
        if 0 in self.image_std:
            raise ConfigError(f"image_std must not hold 0 (normalisation divides by it), got {list(self.image_std)}")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> CvtImageProcessor:
        """Read preprocessor_config.json from a checkpoint directory (or hub id), or a preset name like "cvt-13"
        (unless a file or folder of that name exists). A checkpoint without preprocessor_config.json (as
        transformers' model.save_pretrained writes it) gets CvT's default preprocessing, with a warning."""
        preset = preset_named(name_or_path)
        if preset is not None:
            return cls(size=preset.image_size, **overrides)
        directory = resolve_checkpoint_dir(name_or_path, allow_patterns=[PREPROCESSOR_NAME, CONFIG_NAME])
        path = Path(directory) / PREPROCESSOR_NAME
        if not path.is_file():
            if not (Path(directory) / CONFIG_NAME).is_file():
                raise CheckpointNotFoundError(f"{directory} has neither {PREPROCESSOR_NAME} nor {CONFIG_NAME}")
            logger.warning(
                "cvt_fast: %s has no %s; using CvT's default preprocessing (%s)", directory, PREPROCESSOR_NAME,
                DEFAULT_PREPROCESSING,
            )  # fmt: skip
            return cls(**overrides)
        data = read_json_object(path, ConfigError)
        try:
            cls(**data)
        except ConfigError as error:  # the file's own values are refused naming the file; overrides are the caller's
            raise ConfigError(f"{path}: {error}") from None
        return cls(**{**data, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "ConvNextImageProcessor",
            "size": {"shortest_edge": self.size},
            "crop_pct": self.crop_pct,
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with replacing(Path(directory) / PREPROCESSOR_NAME) as temporary:
            temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    # ---- the pipeline ---------------------------------------------------------------------------------------

    def __call__(self, images, return_tensors: str | None = "pt") -> BatchFeature:
        """One image or a list of them (PIL images, or uint8 numpy arrays of shape (H, W, 3) or (H, W)) ->
        {"pixel_values": (N, 3, size, size) float32 tensor}; return_tensors="np" gives a numpy array."""
        batch = images if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise InputError("no images given")
        arrays = np.stack([self.preprocess_one(image) for image in batch])
        if return_tensors in ("np", None):
            return BatchFeature(pixel_values=arrays)
        if return_tensors != "pt":
            raise InputError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        return BatchFeature(pixel_values=torch.from_numpy(arrays))

    def preprocess_one(self, image) -> np.ndarray:
        """One image -> (3, H, W) float32."""
        image = _to_rgb_pil(image)
        if self.do_resize:
            image = self._resize(image)
        array = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8
        if self.do_resize and self.size < 384:
            array = _center_crop(array, self.size)
        if self.do_rescale:
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(array.dtype, np.floating):
                array = array.astype(np.float32)
            mean = np.asarray(self.image_mean, dtype=array.dtype)[:, None, None]
            std = np.asarray(self.image_std, dtype=array.dtype)[:, None, None]
            array = (array - mean) / std
        return np.ascontiguousarray(array)

    def _resize(self, image):
        if self.size >= 384:  # warp to a square, no crop, as the 384 checkpoints were evaluated
            height, width = self.size, self.size
        else:
            # Shortest edge to size / crop_pct, keeping the aspect ratio (the longer edge truncated, as torchvision).
            short = int(self.size / self.crop_pct)
            w, h = image.size
            if w <= h:
                height, width = int(short * h / w), short
            else:
                height, width = short, int(short * w / h)
        return image.resize((width, height), resample=self.resample)


def _shortest_edge(size: Any) -> int:
    """size as preprocessor_config.json gives it, an int or {"shortest_edge": int}, as an int."""
    if isinstance(size, dict):
        if set(size) != {"shortest_edge"}:
            raise ConfigError(f"size must be an integer or {{'shortest_edge': integer}}, got {describe_value(size)}")
        size = size["shortest_edge"]
    check_integer("size", size, 1)
    return size


def _per_channel(name: str, values: Any) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ConfigError(f"{name} must be a list of 3 numbers (red, green, blue), got {describe_value(values)}")
    for channel, value in enumerate(values):
        check_number(f"{name}[{channel}]", value)
    return tuple(values)


def _to_rgb_pil(image):
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("CvtImageProcessor needs Pillow: pip install pillow") from error
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InputTypeError(f"numpy images must be uint8 (0..255), got {image.dtype}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
            return Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1 else image).convert(
                "RGB"
            )
        raise InputError(f"numpy images must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    raise InputTypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


def _center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size), zero-padding first where the image is smaller, as transformers does."""
    channels, height, width = array.shape
    if height < size or width < size:
        padded = np.zeros((channels, max(height, size), max(width, size)), dtype=array.dtype)
        top, left = (padded.shape[1] - height + 1) // 2, (padded.shape[2] - width + 1) // 2
        padded[:, top : top + height, left : left + width] = array
        array, height, width = padded, padded.shape[1], padded.shape[2]
    top, left = (height - size) // 2, (width - size) // 2
    return array[:, top : top + size, left : left + size]
