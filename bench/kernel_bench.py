"""Kernel benchmarks: each fused op against the PyTorch it replaces, every speed beside its error and its ceiling.

  python bench/kernel_bench.py --out DIR                    # the kernels' own tables against the baselines (CUDA)
  python bench/kernel_bench.py --sweep --out DIR            # and every candidate block configuration (CUDA)
  python bench/kernel_bench.py --rehearse --out DIR         # CPU, Triton interpreter, tiny shapes: errors, no times

qkv_projection (CvT-13 and CvT-W24 stage shapes): the fused kernel against the eager sequence transformers runs
(three depthwise convs, three BatchNorms, three flatten/transposes, three cls concatenations) and against
torch.compile of that sequence; achieved bandwidth over the bytes that must move (input read once, q, k and v
written once) as a fraction of the device's measured copy bandwidth.

attention (every CvT-13/21/W24 stage at 224 and 384): the kernel against transformers' einsum path and every
scaled_dot_product_attention backend that accepts the shape (flash, memory-efficient, cuDNN), each reading and
writing the (B, N, C) layout the model holds; achieved FLOP rate (4 * B * heads * Nq * Nk * head_dim) as a
fraction of the measured bf16 matmul rate. float32 attention (the kernel's tf32x3 dots) is swept against SDPA's.

The sweep times every configuration in each kernel's `candidate_configs()` beside its table's choice
(`default_config`), so that the tables can be chosen afterwards from the data. Cases run most informative first
(bfloat16 at batch 256, then batch 1, then float16 and float32); each record is appended to kernels.jsonl as soon
as it exists and a line printed, so a run stopped at its time budget (--budget-s) keeps everything measured.

Times: triton.testing.do_bench medians (CUDA events, after warm-up); errors: max |kernel - float64 definition|
over max |definition|, on the first two images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cvt_fast import ops
from cvt_fast.testing import relative_error as rel_err

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# (model, image size, stage): (H = W, channels, heads, cls token)
CONV_SHAPES = {
    ("cvt-13", 224, 0): (56, 64, 1, False),
    ("cvt-13", 224, 1): (28, 192, 3, False),
    ("cvt-13", 224, 2): (14, 384, 6, True),
    ("cvt-w24", 384, 0): (96, 192, 3, False),
    ("cvt-w24", 384, 1): (48, 768, 12, False),
    ("cvt-w24", 384, 2): (24, 1024, 16, True),
}
ATTENTION_SHAPES = {  # CvT-21 has CvT-13's widths and heads, so the same stage shapes
    (model, size, stage): (grid, channels, heads, stage == 2)
    for model, widths, heads_per_stage in (
        ("cvt-13/21", (64, 192, 384), (1, 3, 6)),
        ("cvt-w24", (192, 768, 1024), (3, 12, 16)),
    )
    for size in (224, 384)
    for stage, (grid, channels, heads) in enumerate(
        zip((size // 4, size // 8, size // 16), widths, heads_per_stage, strict=True)
    )
}
# The rehearsal's shapes: small enough for the interpreter, awkward enough to exercise tails and the cls row.
REHEARSAL_CONV_SHAPES = {("tiny", 40, 0): (7, 16, 1, False), ("tiny", 40, 2): (5, 24, 1, True)}
REHEARSAL_ATTENTION_SHAPES = {("tiny", 40, 0): (6, 64, 2, False), ("tiny", 40, 2): (5, 64, 2, True)}


class Session:
    """Where records go, how things are timed, the ceilings they are held against, and the time budget."""

    def __init__(self, out: Path | None, rehearse: bool, budget_s: float, quick: bool):
        self.rehearse = rehearse
        self.device = "cpu" if rehearse else "cuda"
        self.deadline = time.monotonic() + budget_s
        self.quick = quick  # the sweep's shorter timing, many configurations per shape
        self.jsonl = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = out / "kernels.jsonl"
            self.jsonl.write_text("")
        self.versions = versions(self.device)
        self.copy_bandwidth = None if rehearse else copy_bandwidth()
        self.matmul_flops = None if rehearse else matmul_rate()
        self.records: list[dict] = []

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def time_ms(self, fn: Callable) -> float | None:
        if self.rehearse:  # the interpreter's timings mean nothing
            return None
        import triton.testing

        warmup, rep = (5, 25) if self.quick else (25, 200)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def emit(self, record: dict) -> None:
        record.update(self.versions, copy_bandwidth_bytes_per_s=self.copy_bandwidth)
        record["matmul_flops_per_s"] = self.matmul_flops
        self.records.append(record)
        if self.jsonl is not None:
            with self.jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
        report(record)


def versions(device: str) -> dict:
    """The device and the versions every benchmark records (cvt_fast.tools.reporting), CUDA's among them."""
    from cvt_fast.tools.reporting import versions as library_versions

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter: rehearsal)"
    return {"device": name, **library_versions(), "cuda": torch.version.cuda}


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting the bytes read and written."""
    import triton.testing

    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def matmul_rate() -> float:
    """FLOP per second of an 8192^3 bfloat16 matrix product on random data."""
    import triton.testing

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def short_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


# ---- qkv projection -----------------------------------------------------------------------------------------


def eager_conv_sequence(x, height, width, with_cls, params):
    """transformers' sequence: per projection a depthwise conv, a BatchNorm, a flatten/transpose and a cat."""
    cls, tokens = ops.split_cls(x, with_cls)
    grid = tokens.permute(0, 2, 1).reshape(x.shape[0], x.shape[2], height, width)
    outputs = []
    for p in params:
        y = F.conv2d(grid, p.weight, None, p.stride, p.padding, groups=x.shape[2])
        y = F.batch_norm(y, p.running_mean, p.running_var, p.bn_weight, p.bn_bias, False, 0.0, p.eps)
        y = y.flatten(2).permute(0, 2, 1)
        outputs.append(torch.cat((cls, y), 1) if cls is not None else y)
    return outputs


def conv_case(session: Session, shape_key, shape, dtype: torch.dtype, batch: int, sweep: bool) -> None:
    from cvt_fast.kernels.conv_projection import ConvConfig, candidate_configs, default_config, qkv_conv_bn

    grid, channels, _, with_cls = shape
    generator = torch.Generator().manual_seed(0)

    def param(stride):
        tensors = [
            torch.randn(channels, 1, 3, 3, generator=generator) / 3,
            1 + 0.1 * torch.randn(channels, generator=generator),
            0.1 * torch.randn(channels, generator=generator),
            0.1 * torch.randn(channels, generator=generator),
            0.5 + torch.rand(channels, generator=generator),
        ]
        return ops.ConvBN(*(t.to(session.device, dtype) for t in tensors), 1e-5, stride, 1)

    params = [param(1), param(2), param(2)]
    x = torch.randn(batch, int(with_cls) + grid * grid, channels, generator=generator).to(session.device, dtype)
    sample = slice(0, 2)
    params64 = [p._replace(**{f: getattr(p, f).double() for f in ops.ConvBN._fields[:5]}) for p in params]
    reference = eager_conv_sequence(x[sample].double(), grid, grid, with_cls, params64)
    flat = ops.qkv_operands(*params)
    contenders: dict[str, tuple[Callable, list | None]] = {
        "eager sequence": (lambda: eager_conv_sequence(x, grid, grid, with_cls, params), None)
    }
    if not session.rehearse:  # inductor on the CPU takes minutes; the rehearsal checks the rest of the path
        compiled = torch.compile(lambda: eager_conv_sequence(x, grid, grid, with_cls, params), dynamic=False)
        contenders["torch.compile(eager sequence)"] = (compiled, None)
    table = default_config(grid * grid, channels, interpreter=session.rehearse)
    contenders["cvt_fast kernel (table)"] = (lambda: qkv_conv_bn(x, grid, grid, with_cls, *flat), list(table))
    if sweep:
        candidates = candidate_configs() if not session.rehearse else [ConvConfig(16, 16, 1, 2)]
        for config in candidates:
            run = lambda config=config: qkv_conv_bn(x, grid, grid, with_cls, *flat, config=config)  # noqa: E731
            contenders["cvt_fast kernel " + "x".join(map(str, config))] = (run, list(config))
    moved = x.numel() * x.element_size() + sum(
        batch * r.shape[1] * r.shape[2] * x.element_size() for r in reference
    )  # fmt: skip
    base, baseline = None, next(iter(contenders))  # the first contender is what the kernel replaces
    for name, (fn, config) in contenders.items():
        record = dict(op="qkv_projection", model=shape_key[0], image_size=shape_key[1], stage=shape_key[2],
                      batch=batch, dtype=str(dtype).removeprefix("torch."), implementation=name, config=config,
                      bytes_moved=moved)  # fmt: skip
        try:
            outputs = fn()
            record["max_rel_err"] = max(rel_err(o[sample], r) for o, r in zip(outputs, reference, strict=True))
            record["ms"] = ms = session.time_ms(fn)
            if ms is not None:
                record["bandwidth_bytes_per_s"] = moved / (ms * 1e-3)
                record["fraction_of_copy_bandwidth"] = record["bandwidth_bytes_per_s"] / session.copy_bandwidth
                if name == baseline:
                    base = ms
                record["speedup_vs_eager"] = base / ms if base is not None else None  # None: the baseline failed
        except Exception as error:  # out of memory, a compile failure: recorded, not fatal
            record["error"] = short_error(error)
        session.emit(record)


# ---- attention ----------------------------------------------------------------------------------------------


def einsum_attention(q, k, v, heads, scale):
    """transformers' path: rearrange, two einsums around a materialised softmax, rearrange back (with a copy)."""
    batch, n_q, channels = q.shape
    qh, kh, vh = (t.view(batch, t.shape[1], heads, channels // heads).permute(0, 2, 1, 3) for t in (q, k, v))
    probs = torch.softmax(torch.einsum("bhlk,bhtk->bhlt", qh, kh) * scale, dim=-1)
    context = torch.einsum("bhlt,bhtv->bhlv", probs, vh)
    return context.permute(0, 2, 1, 3).contiguous().view(batch, n_q, channels)


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, heads, scale):
        qh, kh, vh = (ops.split_heads(t, heads) for t in (q, k, v))
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        return out.transpose(1, 2).reshape(q.shape)

    return run


def attention_case(session: Session, shape_key, shape, dtype: torch.dtype, batch: int, sweep: bool) -> None:
    from torch.nn.attention import SDPBackend

    from cvt_fast.kernels.attention import candidate_configs, default_config, flash_attention
    from cvt_fast.kernels.launch import multiprocessor_count

    grid, channels, heads, with_cls = shape
    n_q, n_k = grid * grid + int(with_cls), ((grid + 1) // 2) ** 2 + int(with_cls)
    head_dim = channels // heads
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, n, channels, generator=generator).to(session.device, dtype) for n in (n_q, n_k, n_k))
    scale = channels**-0.5
    sample = slice(0, 2)
    reference = ops.attention_reference(q[sample].double(), k[sample].double(), v[sample].double(), heads, scale)
    contenders: dict[str, tuple[Callable, list | None]] = {
        "einsum (transformers)": (einsum_attention, None),
        "sdpa flash": (sdpa_with(SDPBackend.FLASH_ATTENTION), None),
        "sdpa memory-efficient": (sdpa_with(SDPBackend.EFFICIENT_ATTENTION), None),
        "sdpa cudnn": (sdpa_with(SDPBackend.CUDNN_ATTENTION), None),
        "sdpa math": (sdpa_with(SDPBackend.MATH), None),
    }
    programs = batch * heads
    table = default_config(n_q, n_k, head_dim, dtype, programs, multiprocessor_count(q.device), session.rehearse)
    contenders["cvt_fast kernel (table)"] = (flash_attention, list(table))
    if sweep:
        for config in candidate_configs(dtype) if not session.rehearse else [table._replace(block_n=16)]:
            run = lambda *a, config=config: flash_attention(*a, config=config)  # noqa: E731
            contenders["cvt_fast kernel " + "x".join(map(str, config))] = (run, list(config))
    flops = 4 * batch * heads * n_q * n_k * head_dim
    base, baseline = None, next(iter(contenders))  # the first contender is what the kernel replaces
    for name, (fn, config) in contenders.items():
        record = dict(op="attention", model=shape_key[0], image_size=shape_key[1], stage=shape_key[2], batch=batch,
                      n_q=n_q, n_k=n_k, heads=heads, dtype=str(dtype).removeprefix("torch."), implementation=name,
                      config=config, flops=flops)  # fmt: skip
        try:
            out = fn(q, k, v, heads, scale)
            record["max_rel_err"] = rel_err(out[sample], reference)
            record["ms"] = ms = session.time_ms(lambda fn=fn: fn(q, k, v, heads, scale))
            if ms is not None:
                record["flops_per_s"] = flops / (ms * 1e-3)
                record["fraction_of_matmul_rate"] = record["flops_per_s"] / session.matmul_flops
                if name == baseline:
                    base = ms
                record["speedup_vs_einsum"] = base / ms if base is not None else None  # None: the baseline failed
        except Exception as error:  # a backend refusing the shape or dtype, out of memory
            record["error"] = short_error(error)
        session.emit(record)
        if session.device == "cuda":
            torch.cuda.empty_cache()


# ---- driver -------------------------------------------------------------------------------------------------


def report(r: dict) -> None:
    where = f"{r['op']:<14} {r['model']:<9} {r['image_size']} s{r['stage']} b{r['batch']:<3} {r['dtype']:<8}"
    if "error" in r:
        print(f"{where} {r['implementation']:<32} error: {r['error']}", flush=True)
        return
    err = f"err {r['max_rel_err']:.1e}"
    if r.get("ms") is None:
        print(f"{where} {r['implementation']:<32} (not timed: rehearsal)  {err}", flush=True)
        return
    speedup = r.get("speedup_vs_eager", r.get("speedup_vs_einsum"))
    ceiling = r.get("fraction_of_copy_bandwidth", r.get("fraction_of_matmul_rate"))
    of = "copy bandwidth" if "fraction_of_copy_bandwidth" in r else "bf16 matmul rate"
    speedup_text = f"{speedup:5.2f}x" if speedup is not None else "    -"  # the baseline failed
    print(f"{where} {r['implementation']:<32} {r['ms']:8.3f} ms  {speedup_text}  {ceiling:6.1%} of {of}  {err}",
          flush=True)  # fmt: skip


def markdown(records: list[dict]) -> str:
    header = "| op | model | size | stage | batch | dtype | implementation | ms | speed-up | of ceiling | max rel err |"
    lines = [header, "|---" * header.count(" | ") + "|---|"]
    for r in records:
        speedup = r.get("speedup_vs_eager", r.get("speedup_vs_einsum"))
        ceiling = r.get("fraction_of_copy_bandwidth", r.get("fraction_of_matmul_rate"))
        cells = [
            *(r[key] for key in ("op", "model", "image_size", "stage", "batch", "dtype", "implementation")),
            f"{r['ms']:.3f}" if r.get("ms") is not None else r.get("error", "-"),
            f"{speedup:.2f}x" if speedup else "-",
            f"{ceiling:.1%}" if ceiling else "-",
            f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def cases(args) -> list[tuple]:
    """(op, shape key, shape, dtype, batch, sweep this case), most informative first."""
    conv_shapes = REHEARSAL_CONV_SHAPES if args.rehearse else CONV_SHAPES
    attention_shapes = REHEARSAL_ATTENTION_SHAPES if args.rehearse else ATTENTION_SHAPES
    plan = []
    for dtype_name in args.dtypes:
        for batch in args.batches:
            # The sweep tries every configuration in bfloat16 (float16 compiles to the same code) and float32
            # attention (tf32x3 against SDPA); the other cases time the tables' choices against the baselines.
            sweep = args.sweep and dtype_name in ("bfloat16", "float32")
            conv_dtype = dtype_name != "float32" or args.rehearse  # float32 projections are not a use case on GPUs
            if "qkv_projection" in args.ops and conv_dtype:
                plan += [("qkv_projection", key, shape, dtype_name, batch, sweep) for key, shape in conv_shapes.items()]
            if "attention" in args.ops:
                plan += [("attention", key, shape, dtype_name, batch, sweep) for key, shape in attention_shapes.items()]
    return plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=["qkv_projection", "attention"],
                        choices=["qkv_projection", "attention"])  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: bfloat16 float16 (with --sweep also float32, for attention)")  # fmt: skip
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 1])
    parser.add_argument("--sweep", action="store_true", help="time every candidate block configuration too")
    parser.add_argument("--rehearse", action="store_true", help="CPU, Triton interpreter, tiny shapes, no timing")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no case after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="folder for kernels.jsonl and kernels.md")
    parser.add_argument("--no-markdown", action="store_true", help="kernels.jsonl only (the GPU session's summary)")
    args = parser.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["bfloat16", "float16"] + (["float32"] if args.sweep else [])
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches must be positive, got {args.batches}")
    if args.rehearse:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--rehearse runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 before starting")
        args.dtypes = [d for d in args.dtypes if d != "bfloat16"] or ["float32"]  # no bfloat16 in the interpreter
        args.batches = [2]
    elif not torch.cuda.is_available():
        print("bench/kernel_bench.py times CUDA kernels and needs a CUDA device (or --rehearse).", file=sys.stderr)
        return 2
    session = Session(args.out, args.rehearse, args.budget_s, quick=args.sweep)
    if session.copy_bandwidth:
        print(f"{session.versions}  copy bandwidth {session.copy_bandwidth / 1e12:.2f} TB/s (read + write), "
              f"bf16 matmul {session.matmul_flops / 1e12:.0f} TFLOP/s", flush=True)  # fmt: skip
    plan = cases(args)
    for index, (op, key, shape, dtype_name, batch, sweep) in enumerate(plan):
        if session.time_left() <= 0:
            print(f"time budget reached: {len(plan) - index} of {len(plan)} cases not run", flush=True)
            break
        run_case = conv_case if op == "qkv_projection" else attention_case
        run_case(session, key, shape, DTYPES[dtype_name], batch, sweep)
    if args.out and not args.no_markdown:
        (args.out / "kernels.md").write_text(markdown(session.records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
