"""`cvt-fast bench`: throughput against transformers with every speed's error beside it (cvt_fast.tools.benchmark), or,
with --resolutions, memory and time against image size (cvt_fast.tools.resolution). What runs by default on this device
is the benchmark modules' own choice; this module only reads the arguments and prints."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import PRESETS
from ..errors import Refused
from ..tools.contenders import RESOLUTION, THROUGHPUT
from .common import at_least_one, device, positive_number


def add_parser(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="throughput against transformers, with errors",
        description="Random-weight models, every contender on the same weights and inputs, each speed printed beside "
        "its error against the float32 reference. On the CPU by default: cvt-13 at 224 px, batch 1 and 8.",
    )
    bench.add_argument("--models", nargs="+", help=f"presets ({', '.join(PRESETS)}) or config.json paths")
    bench.add_argument(
        "--sizes", nargs="+", type=at_least_one, help="image sizes (default: 224 and 384 on GPU, 224 on CPU)"
    )
    bench.add_argument("--batches", nargs="+", type=at_least_one)
    bench.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"])
    bench.add_argument(
        "--implementations",
        nargs="+",
        metavar="NAME",
        help=f"a subset of: {', '.join(THROUGHPUT)}; with --resolutions: {', '.join(RESOLUTION)}",
    )
    bench.add_argument("--device", default=None)
    bench.add_argument(
        "--rounds", type=at_least_one, default=4, help="interleaved timing rounds on the CPU (default 4)"
    )
    bench.add_argument(
        "--threads",
        type=at_least_one,
        help="CPU threads for every contender (torch, ONNX Runtime, OpenVINO alike; default: torch's, the cores)",
    )
    bench.add_argument("--out", type=Path, default=None, help="directory for bench.json, bench.md, bench.png")
    bench.add_argument(
        "--resolutions",
        nargs="+",
        type=at_least_one,
        help="instead: memory and time against image size, e.g. 224 512 1024 2048 (one image, fresh process per "
        "point on the CPU)",
    )
    bench.add_argument(
        "--memory-cap-gib", type=positive_number, default=None, help="with --resolutions: the most a point may use"
    )
    bench.add_argument(
        "--train",
        action="store_true",
        help="instead: a fine-tuning step (forward, backward, AdamW) of cvt_fast against transformers, with peak "
        "memory and the gradients' error against transformers' (default: cvt-13 at 224 px, batch 8, float32)",
    )
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.resolutions and args.train:
        raise Refused("argument --train: not with --resolutions; they are two benchmarks")
    if args.resolutions:
        return _resolutions(args)
    if args.train:
        return _train(args)
    from ..tools import benchmark

    if args.memory_cap_gib is not None:
        raise Refused("argument --memory-cap-gib: only the resolution benchmark (--resolutions) has a memory cap")
    chosen = benchmark.plan(
        device(args.device),
        models=args.models,
        sizes=args.sizes,
        batches=args.batches,
        dtypes=args.dtypes,
        implementations=args.implementations,
    )
    for note in chosen.notes:
        print(note)
    _make_out(args.out)  # now, not after a run of many minutes
    records = benchmark.run(
        chosen.models, chosen.sizes, chosen.batches, chosen.dtypes, chosen.implementations, chosen.device,
        args.rounds, args.out,
    )  # fmt: skip
    benchmark.print_summary(records)
    return 0


def _resolutions(args: argparse.Namespace) -> int:
    """Memory and time against image size."""
    from ..tools import resolution

    for option in ("sizes", "batches"):
        if getattr(args, option) is not None:
            raise Refused(f"argument --{option}: the resolution benchmark takes --resolutions, one image at a time")
    chosen = resolution.plan(
        device(args.device),
        models=args.models,
        resolutions=args.resolutions,
        dtypes=args.dtypes,
        implementations=args.implementations,
    )
    cap = resolution.default_cap_bytes() if args.memory_cap_gib is None else int(args.memory_cap_gib * 2**30)
    _make_out(args.out)
    print(f"memory cap {cap / 2**30:.1f} GiB per point; a contender over it is not tried at larger sizes", flush=True)
    resolution.run(
        chosen.models, chosen.resolutions, chosen.dtypes, chosen.implementations, chosen.device, cap, args.out
    )
    if args.out is not None:
        written = [args.out / f"resolution.{ext}" for ext in ("jsonl", "json", "md", "png")]
        print("results written to " + ", ".join(str(p) for p in written if p.exists()))
    return 0


def _train(args: argparse.Namespace) -> int:
    """A training step against transformers'."""
    import importlib.util

    from ..tools.reporting import check_models, cpu_description
    from ..tools.training_benchmark import run_training

    for option in ("implementations", "memory_cap_gib"):
        if getattr(args, option) is not None:
            raise Refused(
                f"argument --{option.replace('_', '-')}: not with --train (it runs transformers and cvt_fast)"
            )
    if importlib.util.find_spec("transformers") is None:
        raise Refused("argument --train: needs transformers, the baseline (pip install transformers)")
    target = device(args.device)
    models, sizes = args.models or ["cvt-13"], args.sizes or [224]
    check_models(models, sizes)
    batches = args.batches or ([64] if target.type == "cuda" else [8])
    dtypes = args.dtypes or (["bfloat16"] if target.type == "cuda" else ["float32"])
    if target.type == "cpu":
        print(f"on {cpu_description()}")
    _make_out(args.out)
    run_training(models, sizes, batches, dtypes, target, min(args.rounds, 3), args.out)
    return 0


def _make_out(out: Path | None) -> None:
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise Refused(f"argument --out: {out} cannot be made a folder for the results ({error})") from None
