"""FrozenCvt, a frozen CvT ready to run whichever engine runs it, called like the model it was frozen from; and
load_frozen, which makes one from a package."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from ..config import CvtConfig
from ..errors import InputError, InputTypeError
from ..image_processing import CvtImageProcessor
from ..outputs import BaseModelOutputWithCLSToken, ImageClassifierOutputWithNoAttention
from .engines import engine
from .package import check_runnable, is_cvt_archive, read_package_info, unpack, write_package
from .record import FrozenInfo, dtype_name


class OwnedFolder:
    """A temporary folder, deleted once nothing holds it: a FrozenCvt, or the several that one engine's files serve
    (each way of running them that freezing tries)."""

    def __init__(self, path: Path):
        self.path = path
        self._cleanup = weakref.finalize(self, shutil.rmtree, path, True)


class FrozenCvt:
    """A CvT frozen for one input shape and dtype on this CPU class, run by one engine (info.engine: "inductor",
    "onnxruntime" or "openvino"; see cvt_fast.frozen).

    Call it like the model it was frozen from: `frozen(pixel_values)` returns the same output type (logits; or the
    last hidden state and cls token), for pixel_values of the frozen dtype, channels, height and width, and a batch of
    at most `batch_size` images (a smaller batch runs padded to `batch_size`, the same answers at the cost of a full
    batch, on inductor frozen without dynamic_batch; ONNX Runtime and OpenVINO run it as it is). Anything else is
    refused with the frozen shape named.

    A snapshot: edits to the model after freezing do not reach it; freeze again to take them. Inference only: no
    gradients flow through it, and it has no .train(), .to() or parameters."""

    def __init__(self, runner, info: FrozenInfo, files: dict[str, Path], folder: OwnedFolder | None = None):
        self._runner = runner  # pixel_values -> list of output tensors
        self.info = info
        self._files = files  # the engine's artifact: {name in a package: file}
        self._folder = folder  # where the files were made or unpacked, kept while this object lives

    # ---- what it is ---------------------------------------------------------------------------------------------

    @property
    def config(self) -> CvtConfig:
        return self.info.config

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    @property
    def engine(self) -> str:
        return self.info.engine

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
        """The preprocessing recorded with it: the checkpoint's, the one given to freeze, or CvT's default
        (info.processor_source says which)."""
        return CvtImageProcessor(**self.info.processor) if self.info.processor else None

    def __repr__(self) -> str:
        info = self.info
        return (
            f"FrozenCvt({info.model_class}, {info.describe_shape()}, {info.engine} {info.engine_version}"
            f"{' with ' + str(info.settings['streams']) + ' streams' if info.settings.get('streams', 1) > 1 else ''}, "
            "built for "
            f"{info.target.describe()}; a snapshot: edits to the model after freezing do not reach it)"
        )

    # ---- running it ---------------------------------------------------------------------------------------------

    def __call__(self, pixel_values: torch.Tensor | None = None, return_dict: bool | None = None):
        count = self._check(pixel_values)
        batch, channels, height, width = self.info.input_shape
        x = pixel_values.contiguous()
        if count < batch and not self.info.dynamic_batch:  # per-image in eval mode: padding changes no other row
            x = torch.cat((x, x.new_zeros(batch - count, channels, height, width)))
        outputs = [t[:count] for t in self._runner(x)]
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
        """The number of images, once pixel_values is one the frozen model takes."""
        batch, channels, height, width = shape = self.info.input_shape
        expected = f"({batch} or fewer, {channels}, {height}, {width}) {dtype_name(self.dtype)}"
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

    def save(self, path) -> Path:
        """Write the package to `path`, replacing what was there in one step: a .cvt file holds any engine's model
        with its record; a .pt2 file, inductor's alone (a torch AOTInductor package that carries the record in its
        metadata). load_frozen reads either back, in a new process, without freezing again."""
        return write_package(Path(path), self.info, self._files)


def load_frozen(path: str | os.PathLike) -> FrozenCvt:
    """A package written by FrozenCvt.save (or `cvt-fast export --engine ...`), ready to run, without freezing again
    and without transformers, on torch's thread count (torch.set_num_threads before loading to change it). Refused,
    before any of its code loads, when this process cannot run it (PackageMismatchError)."""
    path = Path(path)
    info = read_package_info(path)
    check_runnable(path, info)
    module = engine(info.engine)
    if not is_cvt_archive(path):  # a bare .pt2: the runner reads the archive itself
        files = {module.ARTIFACT: path}
        return FrozenCvt(module.load(files, info), info, files)
    folder = OwnedFolder(Path(tempfile.mkdtemp(prefix="cvt_fast_frozen_")))
    files = unpack(path, module.FILES, folder.path)
    return FrozenCvt(module.load(files, info), info, files, folder)
