"""CvT-13's linear layers on this CPU: PyTorch's F.linear, oneDNN on the weight as it is (what cvt_fast runs), and
oneDNN on a prepacked copy of the weight (faster, but a cache that edits through `.data` leave stale).

    python bench/cpu_linear.py [--threads N] [--dtype float32|bfloat16] [--batches 1 8] [--rounds 15]

Contenders interleaved per shape, medians; the total weighs each shape by how often CvT-13 at 224 px runs it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cvt_fast.tools.benchmark import cpu_description

# (tokens per image, in features, out features, times per CvT-13 forward at 224 px): per stage the q/k/v and output
# projections (q has all tokens, k and v a quarter), then the MLP's two linears.
CVT13_LINEARS = [
    (3136, 64, 64, 2), (785, 64, 64, 2), (3136, 64, 256, 1), (3136, 256, 64, 1),  # stage 1, depth 1
    (784, 192, 192, 4), (197, 192, 192, 4), (784, 192, 768, 2), (784, 768, 192, 2),  # stage 2, depth 2
    (197, 384, 384, 20), (50, 384, 384, 20), (197, 384, 1536, 10), (197, 1536, 384, 10),  # stage 3, depth 10
]  # fmt: skip


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_contenders(x, weight, bias, rows: int, rounds: int) -> dict[str, list[float]]:
    """Each contender's time per call, in ms, `rounds` times, interleaved."""
    with torch.inference_mode():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=rows)
        runs = {
            "F.linear": lambda: F.linear(x, weight, bias),
            "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""),
            "oneDNN prepacked": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""),
        }
        for run in runs.values():
            run()  # warm-up
        samples = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                samples[name].append(median_ms(run, 1))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{cpu_description()}, {args.threads} threads, {args.dtype}")
    for batch in args.batches:
        totals = {}
        for tokens, inputs, outputs, count in CVT13_LINEARS:
            x = torch.randn(batch, tokens, inputs).to(dtype)
            weight, bias = torch.randn(outputs, inputs).to(dtype), torch.randn(outputs).to(dtype)
            samples = time_contenders(x, weight, bias, batch * tokens, args.rounds)
            times = {name: statistics.median(values) for name, values in samples.items()}
            for name, value in times.items():
                totals[name] = totals.get(name, 0.0) + value * count
            print(
                f"batch {batch} {tokens}x{inputs}->{outputs}: "
                + ", ".join(f"{name} {value:.3f} ms" for name, value in times.items())
            )
        base = totals["F.linear"]
        print(
            f"batch {batch}, CvT-13's linear layers: "
            + ", ".join(f"{name} {value:.1f} ms ({base / value:.2f}x)" for name, value in totals.items())
        )


if __name__ == "__main__":
    main()
