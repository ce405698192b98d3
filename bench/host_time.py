"""Host time of one CvT forward at batch 1: what Python and PyTorch's dispatcher cost before any arithmetic.

Two figures per backend, and for transformers' own CvtForImageClassification with the same weights (the baseline),
on this CPU:
  host   the model's layers, heads and strides with every width divided by --narrow (4: head size 16) on a 32 px
         image (grids 8x8, 4x4, 2x2): the same calls in the same order as the real model, each on a few hundred
         numbers, so what remains is host time: Python, the decisions cvt_fast takes, PyTorch's dispatcher. On a
         GPU it is the floor under a batch-1 forward; on a CPU it is paid on top of the arithmetic. (At full width
         a 32 px forward still reads all the weights, 80 MB for CvT-13: memory time, not host time.)
  full   the model itself at --image-size, for scale.

    python bench/host_time.py [--model cvt-13] [--image-size 224] [--threads 2] [--repeats 300]

(Not the meta device: its shape functions are Python decompositions, slower than the CPU's kernels on tiny tensors.)
Medians of about --repeats calls (the full forward takes a tenth of them), under torch.inference_mode(), the two
backends interleaved in rounds (cvt_fast.timing) so that drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse

import torch

import cvt_fast
from cvt_fast.timing import BLOCK, interleaved
from cvt_fast.tools.models import random_model, transformers_twin

BACKENDS = ("auto", "eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt-13")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--narrow", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{args.model} at {args.image_size}, batch 1, float32; torch {torch.__version__}, cvt_fast "
        f"{cvt_fast.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads"
    )
    config = cvt_fast.CvtConfig.from_pretrained(args.model)
    narrow = cvt_fast.CvtConfig.from_pretrained(args.model, embed_dim=[d // args.narrow for d in config.embed_dim])
    cases = (("host", narrow, 32, args.repeats), ("full", config, args.image_size, max(args.repeats // 10, 5)))
    for name, case_config, size, repeats in cases:
        x = torch.randn(1, config.num_channels, size, size)
        models = {backend: random_model(case_config, backend=backend) for backend in BACKENDS}
        models["transformers"] = transformers_twin(models["eager"]).eval()
        rounds = max(repeats // (BLOCK - 1), 2)  # each round counts BLOCK - 1 calls of each backend
        with torch.inference_mode():
            timings = interleaved({b: lambda r, model=model, x=x: model(x) for b, model in models.items()}, rounds)
        baseline = timings["transformers"].seconds
        for backend, timing in timings.items():
            who = "transformers" if backend == "transformers" else f"backend {backend}"
            print(f"  {who:13s} {name} ({size} px): {timing.seconds * 1e3:8.3f} ms per forward, "
                  f"{timing.seconds / baseline:.2f}x transformers' (median of {len(timing.samples)}, rounds apart by "
                  f"{timing.spread:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
