"""`cvt-fast classify`: the top labels of image files, printed; or, with --input and --output, every image of a
folder or list into a JSON-lines file (cvt_fast.tools.dataset_inference: resumable, split across torchrun's
processes). A frozen package (.cvt or .pt2), or --compile, runs the frozen model on the CPU instead of the checkpoint's
eager model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import Refused
from . import model_source
from .common import at_least, at_least_one, check_backend, device


def add_parser(sub) -> None:
    classify = sub.add_parser(
        "classify",
        help="print the top labels of local images, or write those of a folder or list of images to a JSON-lines file",
        description="Image files: their top labels are printed. --input FOLDER_OR_LIST --output FILE: every image "
        "gets one JSON line (path, labels, scores, label_ids; or path and error), decoded in loader workers; "
        "resumable, and split across processes under torchrun (torchrun --nproc_per_node N -m cvt_fast classify ...).",
    )
    classify.add_argument("images", nargs="*", help="image files")
    classify.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (save_pretrained) or hub id, or a frozen package (FILE.cvt or FILE.pt2, from "
        "cvt-fast export) to run on the CPU",
    )
    classify.add_argument(
        "--input", help="instead of image files: a folder (searched recursively) or a text file of image paths"
    )
    classify.add_argument("--output", type=Path, help="with --input: the results, one JSON line per image")
    classify.add_argument("--top-k", type=at_least_one, default=5, help="how many labels to print (default 5)")
    classify.add_argument("--batch-size", type=at_least_one, help="with --input: images per forward pass (default 32)")
    classify.add_argument(
        "--workers",
        type=at_least(0),
        help="with --input: decoding processes per model process (default: 1 on the CPU; on a GPU the cores shared "
        "among the GPUs, less one each, at most 16; 0 decodes in the model's process)",
    )
    classify.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    classify.add_argument("--backend", default=None, choices=["auto", "eager", "triton"])
    classify.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights and inputs (float32)")
    classify.add_argument(
        "--compile",
        action="store_true",
        help="freeze the checkpoint for this CPU first, on its fastest engine (a minute or two; cvt-fast export keeps "
        "the result for the next run), then classify with the frozen model (CPU only; float32, or bfloat16 with "
        "--dtype)",
    )
    classify.add_argument(
        "--overwrite", action="store_true", help="with --input: discard the results of an earlier run and start over"
    )
    classify.set_defaults(func=run)


DATASET_OPTIONS = ("output", "batch_size", "workers", "overwrite")


def run(args: argparse.Namespace) -> int:
    _check_classify_form(args)
    package = model_source.check(args)
    if args.input is not None:
        return model_source.classify_folder(args, package)
    if package or args.compile:
        return _classify_files_frozen(args, package)
    import torch

    from ..modeling import CvtForImageClassification

    target = device(args.device)
    check_backend(args.backend)
    checkpoint = model_source.checkpoint_folder(args.model)  # a local folder, or the hub snapshot of an id
    processor = model_source.checkpoint_processor(checkpoint, args.model)
    images = _read_images(args.images, processor)  # all of them, before the model loads
    model = CvtForImageClassification.from_pretrained(
        checkpoint, backend=args.backend, device=target, dtype=args.dtype or "float32"
    )
    _check_image_sizes(images, model.config)
    for path, pixel_values in images:
        with torch.inference_mode():
            logits = model(pixel_values.to(model.device, model.dtype)).logits
        _print_top(path, logits[0], model.config, args.top_k)
    return 0


def _classify_files_frozen(args: argparse.Namespace, package: bool) -> int:
    """Image files through a frozen model: a package, or the checkpoint compiled now for these images."""
    import torch

    if package:
        frozen = model_source.load_package(args)
        images = _read_images(args.images, model_source.package_processor(frozen, args.model))
    else:
        checkpoint = model_source.checkpoint_folder(args.model)
        processor = model_source.checkpoint_processor(checkpoint, args.model)
        images = _read_images(args.images, processor)
        _check_one_size(images)
        from ..tools.dataset_inference.run import freeze_for_run

        frozen = freeze_for_run(checkpoint, min(len(images), 32), tuple(images[0][1].shape[-2:]), args.dtype,
                                sys.stderr)  # fmt: skip
    _check_frozen_sizes(images, frozen)
    for start in range(0, len(images), frozen.batch_size):
        chunk = images[start : start + frozen.batch_size]
        with torch.inference_mode():
            logits = frozen(torch.cat([pixels for _, pixels in chunk]).to(frozen.dtype)).logits
        for (path, _), row in zip(chunk, logits, strict=True):
            _print_top(path, row, frozen.config, args.top_k)
    return 0


def _print_top(path: str, logits, config, top_k: int) -> None:
    probabilities = logits.float().softmax(-1)
    top = probabilities.topk(min(top_k, probabilities.numel()))
    print(path)
    for p, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        print(f"  {p:7.2%}  {config.id2label.get(index, f'LABEL_{index}')}")


def _check_classify_form(args: argparse.Namespace) -> None:
    """Image files, or --input with --output; the options of one form are refused in the other."""
    if args.input is None:
        if not args.images:
            raise Refused(
                "give image files, or --input FOLDER_OR_LIST with --output FILE (see cvt-fast classify --help)"
            )
        given = [name for name in DATASET_OPTIONS if getattr(args, name) not in (None, False)]
        if given:
            option = "--" + given[0].replace("_", "-")
            raise Refused(f"argument {option}: only with --input (a folder, or a file listing images)")
        if os.environ.get("WORLD_SIZE", "1") not in ("1", ""):
            raise Refused(
                "under torchrun give --input and --output: image files given as arguments would be classified and "
                "printed by every process"
            )
        return
    if args.images:
        raise Refused(
            f"give image files or --input, not both (got {len(args.images)} file(s) and --input {args.input})"
        )
    if args.output is None:
        raise Refused("argument --input: needs --output, the JSON-lines file for the results (e.g. results.jsonl)")


def _check_one_size(images: list[tuple[str, object]]) -> None:
    """--compile compiles for one image size: the preprocessed images must all have it."""
    sizes = {tuple(pixels.shape[-2:]) for _, pixels in images}
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise Refused(f"argument --compile: the images come out of preprocessing in several sizes ({listed}); a "
                      "frozen model takes one")  # fmt: skip


def _check_frozen_sizes(images: list[tuple[str, object]], frozen) -> None:
    height, width = frozen.image_size
    problems = [
        f"{path}: after preprocessing it is {pixels.shape[-2]}x{pixels.shape[-1]}, but the package was frozen for "
        f"{height}x{width}"
        for path, pixels in images
        if tuple(pixels.shape[-2:]) != (height, width)
    ]
    if problems:
        raise Refused(*problems)


def _read_images(paths: list[str], processor) -> list[tuple[str, object]]:
    """(path, pixel values) for every image; if any cannot be read, a refusal that names each of those."""
    images, problems = [], []
    for path in paths:
        try:
            images.append((path, _read_image(path, processor)))
        except Refused as refusal:
            problems.extend(refusal.lines)
    if problems:
        raise Refused(*problems)
    return images


def _read_image(path: str, processor):
    """(1, 3, H, W) pixel values, or a refusal that names the file and what is wrong with it."""
    import torch

    from ..tools.dataset_inference import UnreadableImage, read_pixel_values

    try:
        return torch.from_numpy(read_pixel_values(path, processor))[None]
    except UnreadableImage as unreadable:
        raise Refused(f"{path}: {unreadable.reason}") from None


def _check_image_sizes(images: list[tuple[str, object]], config) -> None:
    """The processed images must suit the model (a preprocessor_config.json may resize them to anything)."""
    from ..checks import check_image_size

    problems = []
    for path, pixel_values in images:
        try:
            check_image_size(config, *pixel_values.shape[-2:])
        except ValueError as error:
            problems.append(f"{path}: after preprocessing, {error}")
    if problems:
        raise Refused(*problems)
