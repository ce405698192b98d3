"""`cvt-fast evaluate`: a checkpoint's accuracy on a labelled image folder (one subfolder per class, named as the
model's labels or as label indices): `classify --input` writes the results file (resumable, split across processes
under torchrun), and its lines are scored: top-1, top-5, and per class."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import Refused
from .common import at_least, at_least_one, first_rank


def add_parser(sub) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="top-1, top-5 and per-class accuracy of a checkpoint on a labelled image folder (FOLDER/<class>/<image>)",
        description="Classifies every image of FOLDER as `cvt-fast classify --input FOLDER --output FILE --top-k 5` "
        "does (the same model options; a checkpoint, or a frozen package to score the model you serve; resumable; "
        "torchrun splits it), then scores the results against each image's class folder. "
        "A class folder is named as one of the model's labels (config.json's id2label) or as a label index.",
    )
    evaluate.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (save_pretrained) or hub id, or a frozen package (.cvt, .pt2)",
    )
    evaluate.add_argument("--input", required=True, help="the labelled folder: one subfolder of images per class")
    evaluate.add_argument("--output", required=True, type=Path, help="the results, one JSON line per image")
    evaluate.add_argument("--metrics", type=Path, help="also write the scores as JSON to this file")
    evaluate.add_argument("--batch-size", type=at_least_one, help="images per forward pass (default 32)")
    evaluate.add_argument("--workers", type=at_least(0), help="decoding processes per model process (as classify)")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    evaluate.add_argument("--backend", default=None, choices=["auto", "eager", "triton"])
    evaluate.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights and inputs (float32)")
    evaluate.add_argument("--overwrite", action="store_true", help="discard the results of an earlier run")
    evaluate.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import CvtConfig
    from ..tools.dataset_inference import folder_as_written, list_images
    from ..tools.evaluation import class_folders, score, write_metrics
    from . import model_source

    if not Path(args.input).is_dir():
        raise Refused(f"argument --input: {args.input} is not a folder; expected FOLDER/<class>/<image>")
    if args.metrics is not None:  # checked now, not after the whole run
        _check_metrics(args.metrics, args.output)
    source = folder_as_written(args.input)
    run = argparse.Namespace(**vars(args), top_k=5, compile=False)  # classified as `classify --input --top-k 5`
    package = model_source.check(run)
    if package:
        from ..frozen import read_package_info

        id2label = read_package_info(args.model).config.id2label
    else:
        id2label = CvtConfig.from_pretrained(model_source.checkpoint_folder(args.model)).id2label
    folders = class_folders(list_images(source).paths, source, id2label)
    status = model_source.classify_folder(run, package)
    if status != 0 or not first_rank():
        return status
    evaluation = score(args.output, source, folders, len(id2label))
    print("\n".join(evaluation.lines()))
    if args.metrics is not None:
        write_metrics(evaluation, args.metrics)
        print(f"scores written to {args.metrics}")
    return 0


def _check_metrics(metrics: Path, output: Path) -> None:
    if metrics.is_dir() or not metrics.parent.is_dir():
        what = "is a folder" if metrics.is_dir() else f"is in {metrics.parent}, which is not a folder"
        raise Refused(f"argument --metrics: {metrics} {what}; expected a file in an existing folder")
    if metrics.resolve() == output.resolve():  # resolve: the same file under two spellings, or through a link
        raise Refused(f"argument --metrics: {metrics} is the --output file; expected another file, or the results "
                      "would be overwritten by the scores")  # fmt: skip
