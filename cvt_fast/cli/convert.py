"""`cvt-fast convert`: a checkpoint of the original CvT (microsoft/CvT's .pth and its YAML spec, or a preset name) into
a save_pretrained folder in transformers' format: config.json, model.safetensors and preprocessor_config.json. The
folder is written beside its final name and renamed into place, so a failure leaves nothing half-written."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointWriteError, Refused, UserError, one_line
from ..files import current_umask
from .common import at_least_one


def add_parser(sub) -> None:
    convert = sub.add_parser(
        "convert",
        help="convert an original CvT checkpoint (microsoft/CvT .pth + YAML spec) to transformers' format",
        description="Reads the .pth with torch.load(weights_only=True), maps every key, checks every shape against the "
        "spec, and writes a folder that cvt_fast and transformers load. The config keeps the weights' own numerics "
        "(QuickGELU, the original's stochastic depth), which cvt_fast runs; transformers ignores them.",
    )
    convert.add_argument("--checkpoint", required=True, type=Path, help="the original .pth file")
    convert.add_argument(
        "--spec", required=True, help="its YAML spec (in microsoft/CvT: experiments/imagenet/cvt/cvt-13-224x224.yaml "
        "and its siblings) or a preset: cvt-13, cvt-13-384, cvt-21, cvt-21-384, cvt-w24, cvt-w24-384",
    )  # fmt: skip
    convert.add_argument("--output", required=True, type=Path, help="the folder to write (new, or empty)")
    convert.add_argument(
        "--image-size", type=at_least_one, metavar="PX", help="the preprocessing size (default: the spec's, else 224)"
    )
    convert.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    output = args.output
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise Refused(f"argument --output: {output} exists and is not an empty folder; expected a new folder")
    if not output.parent.is_dir():
        raise Refused(f"argument --output: {output.parent} is not a folder to write {output.name} in")
    if not args.checkpoint.is_file():
        raise Refused(f"argument --checkpoint: {args.checkpoint} is not a file; expected an original CvT .pth")
    import torch

    from ..image_processing import CvtImageProcessor
    from ..modeling import CvtForImageClassification
    from ..original import spec_image_size

    model = CvtForImageClassification.from_original(args.checkpoint, spec=args.spec, backend="eager")
    size = args.image_size or spec_image_size(args.spec) or 224
    scratch = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        os.chmod(scratch, 0o777 & ~current_umask())  # mkdtemp's folder is its owner's only; the result is not
        logger, level = logging.getLogger("cvt_fast"), logging.getLogger("cvt_fast").level
        logger.setLevel(logging.ERROR)  # save's warning would repeat the note below, on what transformers runs
        try:
            model.save_pretrained(scratch)
        finally:
            logger.setLevel(level)
        CvtImageProcessor(size=size).save_pretrained(scratch)
        os.replace(scratch, output)  # onto an empty folder too (POSIX rename): the user's stays if this fails
    except BaseException as error:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(error, OSError):
            raise CheckpointWriteError(f"cannot write {output} ({_reason(error)}); nothing was written") from error
        raise
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {output}: config.json, model.safetensors, preprocessor_config.json ({parameters / 1e6:.1f}M "
          f"parameters, {model.config.num_labels} labels, {size} px)")  # fmt: skip
    pixels = torch.randn(1, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model(pixels).logits
        exact = type(model).from_pretrained(output, hidden_act="gelu", backend="eager")(pixels).logits
    from ..testing import relative_error

    difference = relative_error(exact, ours)
    print(f"note: the config keeps hidden_act 'quick_gelu' and stochastic_depth 'original', the numerics the "
          f"weights were trained with; cvt_fast runs them. transformers loads this folder but runs exact GELU "
          f"(logits {difference:.1e} apart, relative, on a random image) and its own stochastic depth in "
          "training.")  # fmt: skip
    return 0


def _reason(error: OSError) -> str:
    """Why a write failed, without the scratch folder's name, which the user never gave: save_pretrained's own
    refusal (a CheckpointWriteError) names it, so its cause is read instead, and an OSError's file name is left out."""
    if isinstance(error, UserError) and isinstance(error.__cause__, OSError):
        error = error.__cause__
    return f"[Errno {error.errno}] {error.strerror}" if error.errno and error.strerror else one_line(error)
