"""What `classify` and `evaluate` both take: --model, a checkpoint (a save_pretrained folder or a hub id) or a frozen
package (.cvt, .pt2), with the preprocessing that goes with it; and a folder or list of images classified into a
results file (cvt_fast.tools.dataset_inference)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Refused
from .common import check_backend, first_rank

PACKAGE_SUFFIXES = (".cvt", ".pt2")  # cvt_fast.frozen's package files (not imported here: it imports torch)


def check(args: argparse.Namespace) -> bool:
    """Whether --model is a package; refused before any work: the options a frozen model cannot take, and a missing
    Pillow."""
    package = is_package(args.model)
    if package or getattr(args, "compile", False):
        _check_frozen_options(args, package)
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise Refused("needs Pillow: pip install pillow") from None
    return package


def is_package(model: str) -> bool:
    """--model names a frozen package (FILE.cvt, FILE.pt2) rather than a checkpoint."""
    return str(model).endswith(PACKAGE_SUFFIXES)


def _check_frozen_options(args: argparse.Namespace, package: bool) -> None:
    """A package, or --compile: compiled code on the CPU, with no backend to choose."""
    what = f"--model {args.model}" if package else "--compile"
    if package and args.compile:
        raise Refused(f"argument --compile: {args.model} is a package, frozen already")
    if args.device is not None and args.device != "cpu":
        raise Refused(f"argument --device: {what} runs a frozen model on the CPU, not on {args.device}")
    if args.backend is not None:
        raise Refused(f"argument --backend: {what} runs a frozen model, which has no backend to choose")
    if args.compile and args.dtype == "float16":
        raise Refused("argument --dtype: --compile takes float32 or bfloat16")


def load_package(args: argparse.Namespace):
    from ..frozen import load_frozen

    frozen = load_frozen(args.model)
    if args.dtype is not None and args.dtype != str(frozen.dtype).removeprefix("torch."):
        raise Refused(f"argument --dtype: {args.model} was frozen for {frozen.dtype}, not {args.dtype}")
    if frozen.info.model_class != "CvtForImageClassification":
        raise Refused(f"{args.model} holds a {frozen.info.model_class}, which has no classifier head")
    return frozen


def package_processor(frozen, name: str):
    """The preprocessing a package records; CvT's default, said so, for a package that records none."""
    if frozen.processor is not None:
        return frozen.processor
    from ..image_processing import DEFAULT_PREPROCESSING, CvtImageProcessor

    if first_rank():
        print(f"note: {name} records no preprocessing; using CvT's default ({DEFAULT_PREPROCESSING})", file=sys.stderr)
    return CvtImageProcessor()


def classify_folder(args: argparse.Namespace, package: bool) -> int:
    """A folder or a list of images into a JSON-lines file, in this process or in each of torchrun's."""
    import torch

    from ..tools.dataset_inference import Options, classify_dataset

    if package:
        frozen = load_package(args)
        if args.batch_size is not None and args.batch_size != frozen.batch_size:
            raise Refused(f"argument --batch-size: {args.model} was frozen for batches of {frozen.batch_size} "
                          f"(export it again with --batch-size {args.batch_size})")  # fmt: skip
        return classify_dataset(
            Options(
                source=args.input,
                output=args.output,
                checkpoint=Path(args.model),
                processor=package_processor(frozen, args.model),
                batch_size=frozen.batch_size,
                workers=args.workers,
                top_k=args.top_k,
                device="cpu",
                backend="frozen",
                dtype=frozen.dtype,
                overwrite=args.overwrite,
                frozen=frozen,
            )  # fmt: skip
        )
    backend = "compiled" if args.compile else check_backend(args.backend)
    checkpoint = checkpoint_folder(args.model)
    options = Options(
        source=args.input,
        output=args.output,
        checkpoint=checkpoint,
        processor=checkpoint_processor(checkpoint, args.model),
        batch_size=args.batch_size or 32,
        workers=args.workers,
        top_k=args.top_k,
        device=args.device,
        backend=backend,
        dtype=getattr(torch, args.dtype or "float32"),
        overwrite=args.overwrite,
        compile=args.compile,
    )
    return classify_dataset(options)


def checkpoint_folder(name: str) -> Path:
    """--model as a checkpoint folder with a config.json, refused before anything else is said about it."""
    from ..config import CONFIG_NAME
    from ..hub import resolve_checkpoint_dir

    checkpoint = resolve_checkpoint_dir(name)
    if not (checkpoint / CONFIG_NAME).is_file():
        raise Refused(
            f"argument --model: {checkpoint} has no {CONFIG_NAME}; expected a checkpoint folder as save_pretrained "
            f"writes it ({CONFIG_NAME} beside the weights), a hub id, or a frozen package (.cvt, .pt2)"
        )
    return checkpoint


def checkpoint_processor(checkpoint: Path, name: str):
    from ..image_processing import PREPROCESSOR_NAME, CvtImageProcessor

    if (checkpoint / PREPROCESSOR_NAME).is_file():
        return CvtImageProcessor.from_pretrained(checkpoint)
    return default_processor(name)


def default_processor(name: str):
    from ..image_processing import DEFAULT_PREPROCESSING, PREPROCESSOR_NAME, CvtImageProcessor

    if first_rank():
        print(
            f"note: {name} has no {PREPROCESSOR_NAME}; using CvT's default ({DEFAULT_PREPROCESSING})", file=sys.stderr
        )
    return CvtImageProcessor()
