"""`cvt-fast export`: a checkpoint to ONNX (through the eager path, validated with ONNX Runtime) or to a frozen .pt2
package (compiled ahead of time for this CPU class, checked against float64) before anything is written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Refused
from .common import at_least_one

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}


def add_parser(sub) -> None:
    export = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX, or compile it into a frozen .pt2 package for this CPU",
        description="onnx: through the eager path, float32, dynamic batch, height and width; checked by ONNX Runtime "
        "on random images before anything is written. pt2: compiled ahead of time (AOTInductor, freezing) for one "
        "batch size, image size and dtype on this CPU class; load it with cvt_fast.load_frozen or "
        "cvt-fast classify --model FILE.pt2.",
    )
    export.add_argument("--model", required=True, help="checkpoint directory (save_pretrained) or hub id")
    export.add_argument("--format", default="onnx", choices=list(FORMATS))
    export.add_argument("--output", required=True, type=Path, help="the .onnx or .pt2 file to write")
    export.add_argument(
        "--attention",
        choices=["ort", "onnx"],
        help="onnx: ort, ONNX Runtime's fused MultiHeadAttention (flash-style on the CPU; default); onnx, the standard "
        "opset-23 Attention op, for other runtimes",
    )
    export.add_argument("--no-validate", action="store_true", help="onnx: skip the ONNX Runtime check")
    export.add_argument(
        "--batch-size", type=at_least_one, help="pt2: the largest batch it takes (default 1; smaller ones run padded)"
    )
    export.add_argument(
        "--image-size",
        type=at_least_one,
        nargs="+",
        metavar="PX",
        help="pt2: the image size, or height and width (default: the checkpoint's preprocessing size, else 224)",
    )
    export.add_argument("--dtype", choices=["float32", "bfloat16"], help="pt2: float32 (default) or bfloat16")
    export.add_argument(
        "--autotune",
        action="store_true",
        help="pt2: also time inductor's own GEMM templates against oneDNN's, keeping the faster (twice the compile)",
    )
    export.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    suffix = FORMATS[args.format]
    if args.output.is_dir():
        raise Refused(f"argument --output: {args.output} is a folder; expected the path of the {suffix} file to write")
    if not args.output.parent.is_dir():
        raise Refused(f"argument --output: {args.output.parent} is not a folder to write {args.output.name} in")
    if args.format == "pt2":
        return _pt2(args)
    for option in ("batch_size", "image_size", "dtype", "autotune"):
        if getattr(args, option) not in (None, False):
            raise Refused(f"argument --{option.replace('_', '-')}: only with --format pt2 (ONNX export is float32 "
                          "with dynamic batch, height and width)")  # fmt: skip
    return _onnx(args)


def _onnx(args: argparse.Namespace) -> int:
    from ..export import TOLERANCE, export_onnx, load_for_export, require

    require("onnx", "onnxscript", *(["onnxruntime"] if not args.no_validate else []))  # before minutes of work
    model = load_for_export(args.model)
    sizes = ((1, 224, 224), (2, 192, 288))
    report = export_onnx(model, args.output, attention=args.attention or "ort", validate=not args.no_validate,
                         validation_sizes=sizes)  # fmt: skip
    print(f"wrote {report.path}: {type(model).__name__} -> {report.output_name}, dynamic batch, height and width; "
          f"attention as {report.attention}")  # fmt: skip
    if report.validation:
        shapes = ", ".join("x".join(map(str, shape)) for shape, _ in report.validation)
        print(f"ONNX Runtime on random images ({shapes}): max error {report.max_rel_err:.1e} relative to cvt_fast's "
              f"float32 eager path, within {TOLERANCE:.0e}")  # fmt: skip
    else:
        print("not validated (--no-validate)")
    return 0


def _pt2(args: argparse.Namespace) -> int:
    for option in ("attention", "no_validate"):
        if getattr(args, option) not in (None, False):
            raise Refused(f"argument --{option.replace('_', '-')}: only with --format onnx (a .pt2 package is always "
                          "checked against float64 before it is written)")  # fmt: skip
    if args.output.suffix != ".pt2":
        raise Refused(f"argument --output: {args.output} should end in .pt2 (a torch AOTInductor package)")
    if args.image_size is not None and len(args.image_size) > 2:
        raise Refused(f"argument --image-size: one size or a height and a width, got {len(args.image_size)} numbers")
    from ..frozen import freeze_checkpoint

    sizes = args.image_size
    frozen = freeze_checkpoint(
        args.model,
        batch_size=args.batch_size or 1,
        image_size=None if sizes is None else tuple(sizes) if len(sizes) == 2 else sizes[0],
        dtype=args.dtype or "float32",
        autotune=args.autotune,
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
    frozen.save(args.output)
    checked = ", ".join(f"{name} {error:.1e}" for name, error in frozen.info.validation.items())
    print(f"wrote {args.output}: {frozen!r}")
    print(f"compiled in {frozen.info.compile_s:.0f} s; checked against float64 on random images: {checked} "
          "(relative to the largest magnitude)")  # fmt: skip
    return 0
