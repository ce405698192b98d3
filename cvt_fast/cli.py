"""Command line: `cvt-fast classify` (top labels for local images), `cvt-fast bench` (throughput + errors) and
`cvt-fast export` (ONNX, validated with ONNX Runtime).

Also reachable as `python -m cvt_fast`, which is also torchrun's way in (`torchrun -m cvt_fast classify --input ...`;
cvt_fast.dataset_inference does that work). A failure the user can cause (an argument, an image, a checkpoint or a
config file) ends in one line per problem, `cvt-fast <command>: ...`, naming what is wrong and what was expected, and
exit status 2; a traceback means a bug in cvt_fast. torch is imported only once the arguments parse, so that `--help`
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import PRESETS, preset_named
from .errors import Refused, UserError, one_line


def _first_rank() -> bool:
    """Whether this process speaks for the run: under torchrun, only rank 0 prints a refusal (every rank meets the same
    ones; a rank's own problem reaches rank 0 through cvt_fast.dataset_inference), so it shows once, not N times."""
    return os.environ.get("RANK", "0") in ("0", "")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse's own report is the whole usage block, then the message: one line says it, and where to look.
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n" if _first_rank() else None)


def _at_least(smallest: int):
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < smallest:
            raise argparse.ArgumentTypeError(f"expected a number of at least {smallest}, got {value}")
        return value

    return whole_number


_at_least_one = _at_least(1)


# ---- checks shared by the commands --------------------------------------------------------------------------


def _device(name: str | None):
    """--device as a torch.device this machine has (default: CUDA when there is one)."""
    import torch

    from .checks import check_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return check_device(name)
    except ValueError as error:
        raise Refused(f"argument --device: {error}") from None


def _check_backend(backend: str | None) -> None:
    """--backend is checked by argparse; without it, CVT_FAST_BACKEND from the environment decides."""
    from .ops.dispatch import resolve_backend

    try:
        resolve_backend(backend)
    except ValueError as error:
        raise Refused(str(error)) from None


# ---- classify -----------------------------------------------------------------------------------------------


DATASET_OPTIONS = ("output", "batch_size", "workers", "overwrite")


def _classify(args: argparse.Namespace) -> int:
    _check_classify_form(args)
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise Refused("needs Pillow: pip install pillow") from None
    if args.input is not None:
        return _classify_dataset(args)
    import torch

    from .loading import resolve_checkpoint_dir
    from .modeling import CvtForImageClassification

    device = _device(args.device)
    _check_backend(args.backend)
    checkpoint = resolve_checkpoint_dir(args.model)  # a local folder, or the hub snapshot of an id
    images = _read_images(args.images, _processor(checkpoint, args.model))  # all of them, before the model loads
    model = CvtForImageClassification.from_pretrained(
        checkpoint, backend=args.backend, device=device, dtype=args.dtype or "float32"
    )
    _check_image_sizes(images, model.config)
    for path, pixel_values in images:
        with torch.inference_mode():
            probabilities = model(pixel_values.to(model.device, model.dtype)).logits.float().softmax(-1)[0]
        top = probabilities.topk(min(args.top_k, probabilities.numel()))
        print(path)
        for p, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {p:7.2%}  {model.config.id2label.get(index, f'LABEL_{index}')}")
    return 0


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


def _classify_dataset(args: argparse.Namespace) -> int:
    """A folder or a list of images into a JSON-lines file, in this process or in each of torchrun's."""
    import torch

    from .dataset_inference import Options, classify_dataset
    from .loading import resolve_checkpoint_dir
    from .ops.dispatch import resolve_backend

    _check_backend(args.backend)
    checkpoint = resolve_checkpoint_dir(args.model)
    options = Options(
        source=args.input,
        output=args.output,
        checkpoint=checkpoint,
        processor=_processor(checkpoint, args.model),
        batch_size=args.batch_size or 32,
        workers=args.workers,
        top_k=args.top_k,
        device=args.device,
        backend=resolve_backend(args.backend),
        dtype=getattr(torch, args.dtype or "float32"),
        overwrite=args.overwrite,
    )
    return classify_dataset(options)


def _processor(checkpoint: Path, name: str):
    from .image_processing import DEFAULT_PREPROCESSING, PREPROCESSOR_NAME, CvtImageProcessor

    if (checkpoint / PREPROCESSOR_NAME).is_file():
        return CvtImageProcessor.from_pretrained(checkpoint)
    if _first_rank():
        print(
            f"note: {name} has no {PREPROCESSOR_NAME}; using CvT's default ({DEFAULT_PREPROCESSING})", file=sys.stderr
        )
    return CvtImageProcessor()


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

    from .dataset_inference import UnreadableImage, read_pixel_values

    try:
        return torch.from_numpy(read_pixel_values(path, processor))[None]
    except UnreadableImage as unreadable:
        raise Refused(f"{path}: {unreadable.reason}") from None


def _check_image_sizes(images: list[tuple[str, object]], config) -> None:
    """The processed images must suit the model (a preprocessor_config.json may resize them to anything)."""
    from .checks import check_image_size

    problems = []
    for path, pixel_values in images:
        try:
            check_image_size(config, *pixel_values.shape[-2:])
        except ValueError as error:
            problems.append(f"{path}: after preprocessing, {error}")
    if problems:
        raise Refused(*problems)


# ---- bench --------------------------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from .benchmark import cpu_native_bfloat16, run

    if args.resolutions:
        return _bench_resolutions(args)
    if args.memory_cap_gib is not None:
        raise Refused("argument --memory-cap-gib: only the resolution benchmark (--resolutions) has a memory cap")
    device = _device(args.device)
    on_gpu = device.type == "cuda"
    implementations = _implementations(args.implementations, device)
    models = args.models or (["cvt-13", "cvt-21", "cvt-w24"] if on_gpu else ["cvt-13"])
    sizes = args.sizes or ([224, 384] if on_gpu else [224])
    _check_models(models, sizes)
    batches = args.batches or ([1, 8, 64, 256] if on_gpu else [1, 8])
    # On a GPU the full matrix in every dtype would not fit one sitting: bfloat16 by default, --dtypes for more. On a
    # CPU float32, and bfloat16 too where the CPU computes it natively (elsewhere it is emulated, and slow).
    if args.dtypes:
        dtypes = args.dtypes
    elif on_gpu:
        dtypes = ["bfloat16"]
    else:
        native = cpu_native_bfloat16()
        dtypes = ["float32", "bfloat16"] if native else ["float32"]
        print(f"this CPU {'computes bfloat16 natively (' + native + ')' if native else 'has no native bfloat16'}")
    if args.out is not None:  # now, not after a run of many minutes
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise Refused(f"argument --out: {args.out} cannot be made a folder for the results ({error})") from None
    records = run(models, sizes, batches, dtypes, implementations, device, args.rounds, args.out)
    _print_ratios(records)
    return 0


def _bench_resolutions(args: argparse.Namespace) -> int:
    """Memory and time against image size (cvt_fast.resolution)."""
    from . import resolution

    device = _device(args.device)
    on_gpu = device.type == "cuda"
    for option in ("sizes", "batches"):
        if getattr(args, option) is not None:
            raise Refused(f"argument --{option}: the resolution benchmark takes --resolutions, one image at a time")
    if args.implementations:
        names = args.implementations
    elif on_gpu:
        names = ["transformers", "cvt_fast-eager", "cvt_fast-triton"]
    else:
        names = ["transformers", "cvt_fast-eager"] + (["onnxruntime"] if _has_onnx_runtime() else [])
    unknown = [n for n in names if n not in resolution.IMPLEMENTATIONS]
    if unknown:
        raise Refused(
            f"argument --implementations: unknown {', '.join(map(repr, unknown))}; with --resolutions the "
            f"implementations are {', '.join(resolution.IMPLEMENTATIONS)}"
        )
    if "onnxruntime" in names and on_gpu:
        raise Refused("argument --implementations: onnxruntime runs on the CPU (--device cpu)")
    if "cvt_fast-triton" in names and not on_gpu:
        raise Refused(f"argument --implementations: cvt_fast-triton needs a CUDA device (--device is {device})")
    models = args.models or ["cvt-13"]
    _check_models(models, args.resolutions, option="--resolutions")
    dtypes = args.dtypes or (["float32", "bfloat16"] if on_gpu else ["float32"])
    cap = resolution.default_cap_bytes() if args.memory_cap_gib is None else int(args.memory_cap_gib * 2**30)
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise Refused(f"argument --out: {args.out} cannot be made a folder for the results ({error})") from None
    print(f"memory cap {cap / 2**30:.1f} GiB per point; a contender over it is not tried at larger sizes", flush=True)
    resolution.run(models, args.resolutions, dtypes, list(dict.fromkeys(names)), device, cap, args.out)
    if args.out is not None:
        written = [args.out / f"resolution.{ext}" for ext in ("jsonl", "json", "md", "png")]
        print("results written to " + ", ".join(str(p) for p in written if p.exists()))
    return 0


def _has_onnx_runtime() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime"))


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _implementations(requested: list[str] | None, device) -> list[str]:
    import importlib.util

    from .benchmark import CPU_DEFAULT, GPU_DEFAULT, IMPLEMENTATIONS
    from .kernels.launch import TRITON_INTERPRET

    if requested:
        unknown = [name for name in requested if name not in IMPLEMENTATIONS]
        if unknown:
            raise Refused(
                f"argument --implementations: unknown {', '.join(map(repr, unknown))}; "
                f"the implementations are {', '.join(IMPLEMENTATIONS)}"
            )
        chosen = list(dict.fromkeys(requested))
    elif device.type == "cuda":
        chosen = list(GPU_DEFAULT)
    else:  # the CPU's contenders: eager, compiled, and ONNX Runtime on the export (the Triton kernels need CUDA)
        chosen = list(CPU_DEFAULT)
        if not _has_onnx_runtime():
            chosen.remove("onnxruntime")
            print(
                "note: onnxruntime or onnxscript is not installed; skipping onnxruntime "
                "(pip install onnx onnxscript 'onnxruntime>=1.22')"
            )
    kernel_users = [name for name in chosen if "triton" in name]
    if kernel_users and device.type != "cuda" and not TRITON_INTERPRET:  # under the interpreter run() refuses them
        raise Refused(
            f"argument --implementations: {', '.join(kernel_users)} run(s) the Triton kernels, which need a CUDA "
            f"device (--device is {device})"
        )
    if importlib.util.find_spec("transformers") is None:
        dropped = [name for name in chosen if name.startswith("transformers")]
        chosen = [name for name in chosen if not name.startswith("transformers")]
        if not chosen:
            raise Refused(f"{', '.join(dropped)}: needs transformers (pip install transformers)")
        if dropped:
            print(f"note: transformers is not installed; skipping {', '.join(dropped)} (pip install transformers)")
    return chosen


def _check_models(models: list[str], sizes: list[int], option: str = "--sizes") -> None:
    """Every --models entry names a preset or a config file, and every --sizes entry suits every model."""
    from .checks import check_image_size
    from .config import CvtConfig

    for name in models:
        if (preset := preset_named(name)) is not None:
            config = preset.config()
        elif Path(name).exists():
            config = CvtConfig.from_pretrained(name)  # its refusals name the file
        else:
            raise Refused(
                f"argument --models: unknown preset {name!r}; the presets are {', '.join(PRESETS)} "
                "(or give the path of a config.json)"
            )
        for size in sizes:
            try:
                check_image_size(config, size, size)
            except ValueError as error:
                raise Refused(f"argument {option}: {size} does not suit {name}: {error}") from None


def _print_ratios(records: list) -> None:
    baseline = "transformers-eager"
    print()
    for r in records:
        if r.implementation == baseline or not r.images_per_s:
            continue
        case = (r.model, r.image_size, r.batch, r.dtype)
        base = next(
            (b for b in records if b.implementation == baseline and (b.model, b.image_size, b.batch, b.dtype) == case),
            None,
        )
        if base and base.images_per_s:
            print(
                f"{r.model} {r.image_size}px batch {r.batch} {r.dtype}: {r.implementation} is "
                f"{r.images_per_s / base.images_per_s:.2f}x {baseline}; its logits are within {r.max_err:.1e} of "
                f"the float32 reference (which is itself within {r.ref64_err:.1e} of float64)"
            )


# ---- export -------------------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from .export import TOLERANCE, export_onnx, load_for_export, require

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


# ---- main ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cvt-fast", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = parser.add_subparsers(dest="command", required=True)

    classify = sub.add_parser(
        "classify",
        help="print the top labels of local images, or write those of a folder or list of images to a JSON-lines file",
        description="Image files: their top labels are printed. --input FOLDER_OR_LIST --output FILE: every image "
        "gets one JSON line (path, labels, scores, label_ids; or path and error), decoded in loader workers; "
        "resumable, and split across processes under torchrun (torchrun --nproc_per_node N -m cvt_fast classify ...).",
    )
    classify.add_argument("images", nargs="*", help="image files")
    classify.add_argument("--model", required=True, help="checkpoint directory (save_pretrained) or hub id")
    classify.add_argument(
        "--input", help="instead of image files: a folder (searched recursively) or a text file of image paths"
    )
    classify.add_argument("--output", type=Path, help="with --input: the results, one JSON line per image")
    classify.add_argument("--top-k", type=_at_least_one, default=5, help="how many labels to print (default 5)")
    classify.add_argument("--batch-size", type=_at_least_one, help="with --input: images per forward pass (default 32)")
    classify.add_argument(
        "--workers",
        type=_at_least(0),
        help="with --input: decoding processes per model process (default: 1 on the CPU; on a GPU the cores shared "
        "among the GPUs, less one each, at most 16; 0 decodes in the model's process)",
    )
    classify.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    classify.add_argument("--backend", default=None, choices=["auto", "eager", "triton"])
    classify.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights and inputs (float32)")
    classify.add_argument(
        "--overwrite", action="store_true", help="with --input: discard the results of an earlier run and start over"
    )
    classify.set_defaults(func=_classify)

    bench = sub.add_parser(
        "bench",
        help="throughput against transformers, with errors",
        description="Random-weight models; on the CPU a short run of the eager paths (cvt-13, 224px, batch 1 and 8).",
    )
    bench.add_argument("--models", nargs="+", help=f"presets ({', '.join(PRESETS)}) or config.json paths")
    bench.add_argument(
        "--sizes", nargs="+", type=_at_least_one, help="image sizes (default: 224 and 384 on GPU, 224 on CPU)"
    )
    bench.add_argument("--batches", nargs="+", type=_at_least_one)
    bench.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--implementations", nargs="+", help="subset of the implementations, see cvt_fast.benchmark")
    bench.add_argument("--device", default=None)
    bench.add_argument("--rounds", type=_at_least_one, default=5, help="interleaved timing rounds on the CPU")
    bench.add_argument("--out", type=Path, default=None, help="directory for bench.json, bench.md, bench.png")
    bench.add_argument(
        "--resolutions",
        nargs="+",
        type=_at_least_one,
        help="instead: memory and time against image size, e.g. 224 512 1024 2048 (one image, fresh process per "
        "point on the CPU)",
    )
    bench.add_argument(
        "--memory-cap-gib", type=_positive_number, default=None, help="with --resolutions: the most a point may use"
    )
    bench.set_defaults(func=_bench)

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
    export.set_defaults(func=_export)
    return parser


def _user_error_lines(error: Exception) -> tuple[str, ...] | None:
    """The lines to print for a failure the user caused, or None for anything else (a bug: let it show)."""
    if isinstance(error, UserError):
        return () if error.reported else tuple(one_line(line, limit=1000) for line in error.lines)
    if isinstance(error, (FileNotFoundError, ImportError)):  # a path given, an optional package missing
        return (one_line(error, limit=1000),)
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = f"cvt-fast {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        lines = _user_error_lines(error)
        export = sys.modules.get("cvt_fast.export")  # imported whenever an ExportError can have been raised
        if lines is None and export is not None and isinstance(error, export.ExportError):  # failed its own check
            print(f"{prog}: {error}", file=sys.stderr)
            return 1
        if lines is None:
            raise
        for line in lines if _first_rank() else ():
            print(f"{prog}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
