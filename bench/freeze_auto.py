"""What `cvt_fast.freeze(engine="auto")` chooses on this CPU, and why: a random-weight CvT frozen for each batch size
and dtype asked for, every engine's trial (built, checked against float64, timed here, or why skipped) written down.

    python bench/freeze_auto.py --threads 2 --batches 1 8 --dtypes float32 bfloat16 --out bench/results/<machine>-auto

Writes freeze_auto.json (one record per freeze: the CPU, the versions, the engine kept, each trial) and
freeze_auto.md; each record is written the moment its freeze ends, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import cvt_fast
from cvt_fast.tools.models import random_model
from cvt_fast.tools.reporting import cpu_description, markdown_table, versions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cvt-13", help="a preset or a config.json (default cvt-13)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "fastest"])
    parser.add_argument("--threads", type=int, help="torch's threads, which every engine uses (default: torch's)")
    parser.add_argument("--out", type=Path, required=True, help="folder for freeze_auto.json and freeze_auto.md")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = random_model(args.model)
    records = []
    for dtype in args.dtypes:
        for batch in args.batches:
            print(f"{args.model} {args.image_size}px batch {batch} {dtype}: freezing on every engine", file=sys.stderr)
            start = time.perf_counter()
            frozen = cvt_fast.freeze(model, batch_size=batch, image_size=args.image_size, dtype=dtype)
            info = frozen.info
            records.append({
                "cpu": cpu_description(), **versions(), "model": args.model, "image_size": args.image_size,
                "batch": batch, "dtype": str(info.dtype).removeprefix("torch."), "asked_dtype": dtype,
                "threads": info.threads, "chosen": info.engine, "settings": info.settings,
                "freeze_s": time.perf_counter() - start, "trials": [dataclasses.asdict(t) for t in info.trials],
            })  # fmt: skip
            for trial in info.trials:
                print(f"  {trial.describe()}", file=sys.stderr)
            (args.out / "freeze_auto.json").write_text(json.dumps(records, indent=1) + "\n")
    rows = [
        (
            r["model"],
            r["batch"],
            r["dtype"],
            r["threads"],
            t["engine"] + _streams(t),
            t["status"],
            f"{t['images_per_s']:.1f}" if t["images_per_s"] else "-",
            ", ".join(f"{k} {v:.1e}" for k, v in t["errors"].items()) or "-",
            f"{t['build_s']:.1f}" if t["build_s"] else "-",
            t["reason"] or "",
        )  # fmt: skip
        for r in records
        for t in r["trials"]
    ]
    header = ["model", "batch", "dtype", "threads", "engine", "status", "images/s", "error vs float64", "build s",
              "reason"]  # fmt: skip
    (args.out / "freeze_auto.md").write_text(f"{records[0]['cpu']}\n\n{markdown_table(header, rows)}\n")
    print(f"written: {args.out / 'freeze_auto.json'}, {args.out / 'freeze_auto.md'}")
    return 0


def _streams(trial: dict) -> str:
    streams = trial["settings"].get("streams", 1)
    return f" ({streams} streams)" if streams > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
