"""`cvt-fast export`: a checkpoint to ONNX (FILE.onnx: through the eager path, validated with ONNX Runtime), or frozen
for this CPU into a package (FILE.cvt, on the engine this CPU runs it fastest on or the one named; FILE.pt2,
inductor's alone), checked against float64 before anything is written. The output's suffix says which."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Refused
from .common import at_least_one

SUFFIXES = {".onnx": "an ONNX file", ".cvt": "a frozen package (any engine)", ".pt2": "a frozen package (inductor's)"}
ENGINES = ("auto", "inductor", "onnxruntime", "openvino")  # cvt_fast.frozen.ENGINE_CHOICES, without importing torch
PACKAGE_OPTIONS = ("engine", "batch_size", "image_size", "dtype", "autotune")


def add_parser(sub) -> None:
    export = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX, or freeze it into a package for this CPU on its fastest engine",
        description="--output FILE.onnx: through the eager path, float32, dynamic batch, height and width; checked by "
        "ONNX Runtime on random images before anything is written. --output FILE.cvt: frozen for one batch size, image "
        "size and dtype on this CPU, on every engine installed (inductor, ONNX Runtime, OpenVINO), each checked "
        "against float64 and timed here, the fastest kept (--engine names one instead); FILE.pt2: inductor's alone, "
        "as a torch AOTInductor package. Load a package with cvt_fast.load_frozen or cvt-fast classify --model FILE.",
    )
    export.add_argument("--model", required=True, help="checkpoint directory (save_pretrained) or hub id")
    export.add_argument(
        "--output", required=True, type=Path, help="the file to write: FILE.onnx, FILE.cvt or FILE.pt2 (see above)"
    )
    export.add_argument(
        "--attention",
        choices=["ort", "onnx"],
        help="onnx: ort, ONNX Runtime's fused MultiHeadAttention (flash-style on the CPU; default); onnx, the standard "
        "opset-23 Attention op, for other runtimes",
    )
    export.add_argument("--no-validate", action="store_true", help="onnx: skip the ONNX Runtime check")
    export.add_argument(
        "--engine",
        choices=ENGINES,
        help="package: auto (the default for .cvt) builds on every engine installed and keeps the fastest correct one "
        "on this CPU; or the one named (.pt2: inductor)",
    )
    export.add_argument(
        "--batch-size", type=at_least_one, help="package: the largest batch it takes (default 1; smaller ones run as "
        "they are on ONNX Runtime, padded elsewhere)"
    )  # fmt: skip
    export.add_argument(
        "--image-size",
        type=at_least_one,
        nargs="+",
        metavar="PX",
        help="package: the image size, or height and width (default: the checkpoint's preprocessing size, else 224)",
    )
    export.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "fastest"],
        help="package: float32 (default), bfloat16, or fastest (bfloat16 where this CPU computes it natively)",
    )
    export.add_argument(
        "--autotune",
        action="store_true",
        help="package: inductor also times its own GEMM templates against oneDNN's, keeping the faster (twice the "
        "compile)",
    )
    export.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    suffix = args.output.suffix
    kinds = "; ".join(f"{s} {what}" for s, what in SUFFIXES.items())
    if args.output.is_dir():
        raise Refused(f"argument --output: {args.output} is a folder; expected the path of the file to write ({kinds})")
    if suffix not in SUFFIXES:
        raise Refused(f"argument --output: {args.output} ends in {suffix or 'no suffix'}; expected {kinds}")
    if not args.output.parent.is_dir():
        raise Refused(f"argument --output: {args.output.parent} is not a folder to write {args.output.name} in")
    if suffix != ".onnx":
        return _package(args)
    for option in PACKAGE_OPTIONS:
        if getattr(args, option) not in (None, False):
            raise Refused(f"argument --{option.replace('_', '-')}: only for a package (.cvt, .pt2); ONNX export is "
                          "float32 with dynamic batch, height and width")  # fmt: skip
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


def _package(args: argparse.Namespace) -> int:
    for option in ("attention", "no_validate"):
        if getattr(args, option) not in (None, False):
            raise Refused(f"argument --{option.replace('_', '-')}: only for an ONNX file (.onnx); a package is always "
                          "checked against float64 before it is written")  # fmt: skip
    engine = args.engine or ("inductor" if args.output.suffix == ".pt2" else "auto")
    if args.output.suffix == ".pt2" and engine != "inductor":
        raise Refused(f"argument --engine: {engine}, but {args.output} is a .pt2 file, which holds inductor's packages "
                      f"only; write {args.output.with_suffix('.cvt').name} (any engine)")  # fmt: skip
    if args.image_size is not None and len(args.image_size) > 2:
        raise Refused(f"argument --image-size: one size or a height and a width, got {len(args.image_size)} numbers")
    from ..frozen import freeze_checkpoint

    sizes = args.image_size
    frozen = freeze_checkpoint(
        args.model,
        batch_size=args.batch_size or 1,
        image_size=None if sizes is None else tuple(sizes) if len(sizes) == 2 else sizes[0],
        dtype=args.dtype or "float32",
        engine=engine,
        autotune=args.autotune,
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
    frozen.save(args.output)
    print_trials(frozen)
    print(f"wrote {args.output}: {frozen!r}")
    return 0


def print_trials(frozen, file=None) -> None:
    """What freezing found of each engine, a line each, then the kept one's check against float64."""
    info = frozen.info
    if len(info.trials) > 1:
        print(f"engines, {info.threads} threads, {info.describe_shape()}:", file=file)
        for trial in info.trials:
            print(f"  {trial.describe()}", file=file)
    checked = ", ".join(f"{name} {error:.1e}" for name, error in info.validation.items())
    print(f"{info.engine}: built in {info.compile_s:.0f} s; checked against float64 on random images: {checked} "
          "(relative to the largest magnitude)", file=file)  # fmt: skip
