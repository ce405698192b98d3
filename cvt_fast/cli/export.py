"""`cvt-fast export`: a checkpoint to ONNX through the eager path, validated with ONNX Runtime before it is written."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import Refused


def add_parser(sub) -> None:
    export = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX, validated with ONNX Runtime",
        description="Through the eager path, float32, dynamic batch, height and width; checked by ONNX Runtime on "
        "random images before anything is written.",
    )
    export.add_argument("--model", required=True, help="checkpoint directory (save_pretrained) or hub id")
    export.add_argument("--format", default="onnx", choices=["onnx"])
    export.add_argument("--output", required=True, type=Path, help="the .onnx file to write")
    export.add_argument(
        "--attention",
        default="ort",
        choices=["ort", "onnx"],
        help="ort: ONNX Runtime's fused MultiHeadAttention (flash-style on the CPU; default); onnx: the standard "
        "opset-23 Attention op, for other runtimes",
    )
    export.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime check")
    export.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import TOLERANCE, export_onnx, load_for_export, require

    require("onnx", "onnxscript", *(["onnxruntime"] if not args.no_validate else []))  # before minutes of work
    if args.output.is_dir():
        raise Refused(f"argument --output: {args.output} is a folder; expected the path of the .onnx file to write")
    if not args.output.parent.is_dir():
        raise Refused(f"argument --output: {args.output.parent} is not a folder to write {args.output.name} in")
    model = load_for_export(args.model)
    sizes = ((1, 224, 224), (2, 192, 288))
    report = export_onnx(model, args.output, attention=args.attention, validate=not args.no_validate,
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
