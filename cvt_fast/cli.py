"""Command line: `cvt-fast classify` (top labels for local images) and `cvt-fast bench` (throughput + errors).

Also reachable as `python -m cvt_fast`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _classify(args: argparse.Namespace) -> int:
    import torch

    from .image_processing import PREPROCESSOR_NAME, CvtImageProcessor
    from .modeling import CvtForImageClassification

    try:
        from PIL import Image
    except ImportError:
        print("cvt-fast classify needs Pillow: pip install pillow", file=sys.stderr)
        return 2
    from .loading import resolve_checkpoint_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = resolve_checkpoint_dir(args.model)  # a local folder, or the hub snapshot of an id
    model = CvtForImageClassification.from_pretrained(checkpoint, backend=args.backend, device=device)
    if (checkpoint / PREPROCESSOR_NAME).is_file():
        processor = CvtImageProcessor.from_pretrained(checkpoint)
    else:
        processor = CvtImageProcessor()
        print(f"note: {args.model} has no {PREPROCESSOR_NAME}; using the CvT default (224px, crop 0.875)")
    for path in args.images:
        try:
            image = Image.open(path)
        except (OSError, ValueError) as error:
            print(f"{path}: cannot read the image ({error})", file=sys.stderr)
            return 1
        pixel_values = processor(image)["pixel_values"].to(model.device)
        with torch.inference_mode():
            probabilities = model(pixel_values).logits.float().softmax(-1)[0]
        top = probabilities.topk(min(args.top_k, probabilities.numel()))
        print(path)
        for p, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {p:7.2%}  {model.config.id2label.get(index, f'LABEL_{index}')}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmark import IMPLEMENTATIONS, run

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("cvt-fast bench: --device cuda, but this machine has no CUDA device", file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401

        have_transformers = True
    except ImportError:
        have_transformers = False
    if args.implementations:
        implementations = args.implementations
    elif on_gpu:
        implementations = list(IMPLEMENTATIONS)
    else:  # the short CPU run: the eager paths (Triton kernels need CUDA; compile is for the GPU run)
        implementations = ["transformers-eager", "cvt_fast-eager"]
    if not have_transformers:
        dropped = [i for i in implementations if i.startswith("transformers")]
        implementations = [i for i in implementations if not i.startswith("transformers")]
        if dropped:
            print(f"note: transformers is not installed; skipping {', '.join(dropped)} (pip install transformers)")
    models = args.models or (["cvt-13", "cvt-21", "cvt-w24"] if on_gpu else ["cvt-13"])
    sizes = args.sizes or ([224, 384] if on_gpu else [224])
    batches = args.batches or ([1, 8, 64, 256] if on_gpu else [1, 8])
    # On a GPU the full matrix in every dtype would not fit one sitting: bfloat16 by default, --dtypes for more.
    dtypes = args.dtypes or (["bfloat16"] if on_gpu else ["float32"])
    records = run(models, sizes, batches, dtypes, implementations, device, args.rounds, args.out)

    baseline = "transformers-eager"
    print()
    for r in records:
        if r.implementation == baseline or not r.images_per_s:
            continue
        base = next(
            (
                b
                for b in records
                if b.implementation == baseline
                and (b.model, b.image_size, b.batch, b.dtype) == (r.model, r.image_size, r.batch, r.dtype)
            ),
            None,
        )
        if base and base.images_per_s:
            print(
                f"{r.model} {r.image_size}px batch {r.batch} {r.dtype}: {r.implementation} is "
                f"{r.images_per_s / base.images_per_s:.2f}x {baseline}; its logits are within {r.max_err:.1e} of "
                f"the float32 reference (which is itself within {r.ref64_err:.1e} of float64)"
            )
    if args.out:
        print(f"results written to {args.out}/bench.json, bench.md" + (", bench.png" if on_gpu else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvt-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    classify = sub.add_parser("classify", help="print the top labels of local images")
    classify.add_argument("images", nargs="+", help="image files")
    classify.add_argument("--model", required=True, help="checkpoint directory (save_pretrained) or hub id")
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    classify.add_argument("--backend", default=None, choices=["auto", "eager", "triton"])
    classify.set_defaults(func=_classify)

    bench = sub.add_parser(
        "bench",
        help="throughput against transformers, with errors",
        description="Random-weight models; on the CPU a short run of the eager paths (cvt-13, 224px, batch 1 and 8).",
    )
    bench.add_argument("--models", nargs="+", help="presets (cvt-13, cvt-21, cvt-w24, ...) or config paths")
    bench.add_argument("--sizes", nargs="+", type=int, help="image sizes (default: 224 and 384 on GPU, 224 on CPU)")
    bench.add_argument("--batches", nargs="+", type=int)
    bench.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--implementations", nargs="+", help="subset of the implementations, see cvt_fast.benchmark")
    bench.add_argument("--device", default=None)
    bench.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds on the CPU")
    bench.add_argument("--out", type=Path, default=None, help="directory for bench.json, bench.md, bench.png")
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    from .benchmark import BenchmarkRefused
    from .dispatch import KernelUnavailableError
    from .loading import CheckpointError

    try:
        return args.func(args)
    except (BenchmarkRefused, CheckpointError, FileNotFoundError, ImportError, KernelUnavailableError) as error:
        print(f"cvt-fast {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
