"""Kernel benchmarks on a CUDA GPU: each fused op against the PyTorch it replaces, with its error beside its speed.

  python bench/kernels.py --out bench/results            # both ops, float16 and bfloat16, batch 1, 32, 256
  python bench/kernels.py --ops attention --batches 32   # a subset

qkv_projection (CvT-13 and CvT-W24 stage shapes): the fused kernel against the eager sequence transformers runs
(three depthwise convs, three BatchNorms, three flatten/transposes, three cls concatenations) and against
torch.compile of that sequence; achieved bandwidth over the bytes that must move (input read once, q, k and v
written once) as a fraction of the device's measured copy bandwidth.

attention (every CvT-13/21/W24 stage at 224 and 384): the kernel against transformers' einsum path and every
scaled_dot_product_attention backend that accepts the shape (flash, memory-efficient, cuDNN), each reading and
writing the (B, N, C) layout the model holds.

Times: triton.testing.do_bench medians (CUDA events, after warm-up). Results: JSON records with device and
versions, and a markdown table. Refuses to run without CUDA (the Triton interpreter's timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cvt_fast import ops

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


def versions() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting the bytes read and written."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def rel_err(actual, expected) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


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


def bench_conv(batch, dtype, shape_key, bandwidth, records):
    from cvt_fast.kernels import qkv_conv_bn

    grid, channels, _, with_cls = CONV_SHAPES[shape_key]
    generator = torch.Generator().manual_seed(0)

    def param(stride):
        tensors = [
            torch.randn(channels, 1, 3, 3, generator=generator) / 3,
            1 + 0.1 * torch.randn(channels, generator=generator),
            0.1 * torch.randn(channels, generator=generator),
            0.1 * torch.randn(channels, generator=generator),
            0.5 + torch.rand(channels, generator=generator),
        ]
        return ops.ConvBN(*(t.to("cuda", dtype) for t in tensors), 1e-5, stride, 1)

    params = [param(1), param(2), param(2)]
    x = torch.randn(batch, int(with_cls) + grid * grid, channels, generator=generator).to("cuda", dtype)
    reference = ops.qkv_projection_reference(
        x.double(),
        grid,
        grid,
        with_cls,
        *[p._replace(**{f: getattr(p, f).double() for f in ops.ConvBN._fields[:5]}) for p in params],
    )
    flat = ops.flatten_conv_bn(*params)
    contenders = {
        "eager sequence": lambda: eager_conv_sequence(x, grid, grid, with_cls, params),
        "torch.compile(eager sequence)": torch.compile(lambda: eager_conv_sequence(x, grid, grid, with_cls, params)),
        "cvt_fast kernel": lambda: qkv_conv_bn(x, grid, grid, with_cls, *flat),
    }
    moved = x.numel() * x.element_size() + sum(r.numel() for r in reference) * x.element_size()
    base = None
    for name, fn in contenders.items():
        record = dict(
            op="qkv_projection",
            model=shape_key[0],
            image_size=shape_key[1],
            stage=shape_key[2],
            batch=batch,
            dtype=str(dtype).removeprefix("torch."),
            implementation=name,
            **versions(),
        )
        try:
            outputs = fn()
            record["max_rel_err"] = max(rel_err(o, r) for o, r in zip(outputs, reference, strict=True))
            record["ms"] = bench_ms(fn)
            record["bytes_moved"] = moved
            record["fraction_of_copy_bandwidth"] = moved / (record["ms"] * 1e-3) / bandwidth
            base = base or record["ms"]
            record["speedup_vs_eager"] = base / record["ms"]
        except Exception as error:  # out of memory, a compile failure: recorded, not fatal
            record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        records.append(record)
        report(record)


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


def bench_attention(batch, dtype, shape_key, records):
    from torch.nn.attention import SDPBackend

    from cvt_fast.kernels import flash_attention

    grid, channels, heads, with_cls = ATTENTION_SHAPES[shape_key]
    n_q, n_k = grid * grid + int(with_cls), ((grid + 1) // 2) ** 2 + int(with_cls)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, n, channels, generator=generator).to("cuda", dtype) for n in (n_q, n_k, n_k))
    scale = channels**-0.5
    sample = slice(0, min(batch, 4))  # the float64 reference on a few images is enough to measure the error
    reference = ops.attention_reference(q[sample].double(), k[sample].double(), v[sample].double(), heads, scale)
    contenders = {
        "einsum (transformers)": einsum_attention,
        "sdpa flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa memory-efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "cvt_fast kernel": flash_attention,
    }
    base = None
    for name, fn in contenders.items():
        record = dict(op="attention", model=shape_key[0], image_size=shape_key[1], stage=shape_key[2], batch=batch,
                      n_q=n_q, n_k=n_k, heads=heads, dtype=str(dtype).removeprefix("torch."), implementation=name,
                      **versions())  # fmt: skip
        try:
            out = fn(q, k, v, heads, scale)
            record["max_rel_err"] = rel_err(out[sample], reference)
            record["ms"] = bench_ms(lambda fn=fn: fn(q, k, v, heads, scale))
            base = base or record["ms"]
            record["speedup_vs_einsum"] = base / record["ms"]
        except Exception as error:  # a backend refusing the shape or dtype, out of memory
            record["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        records.append(record)
        report(record)
        torch.cuda.empty_cache()


# ---- driver -------------------------------------------------------------------------------------------------


def report(r):
    where = f"{r['op']:<14} {r['model']:<9} {r['image_size']} s{r['stage']} b{r['batch']:<3} {r['dtype']:<8}"
    if "error" in r:
        print(f"{where} {r['implementation']:<30} error: {r['error']}", flush=True)
        return
    extra = f"  {r['fraction_of_copy_bandwidth']:.0%} of copy bandwidth" if "fraction_of_copy_bandwidth" in r else ""
    speedup = r.get("speedup_vs_eager", r.get("speedup_vs_einsum"))
    print(
        f"{where} {r['implementation']:<30} {r['ms']:8.3f} ms  {speedup:5.2f}x  err {r['max_rel_err']:.1e}{extra}",
        flush=True,
    )


def markdown(records) -> str:
    header = "| op | model | size | stage | batch | dtype | implementation | ms | speed-up | max rel err | note |"
    lines = [header, "|---" * header.count(" | ") + "|---|"]
    for r in records:
        speedup = r.get("speedup_vs_eager", r.get("speedup_vs_einsum"))
        note = r.get("error", "")
        if "fraction_of_copy_bandwidth" in r:
            note = f"{r['fraction_of_copy_bandwidth']:.0%} of copy bandwidth"
        cells = [
            *(r[key] for key in ("op", "model", "image_size", "stage", "batch", "dtype", "implementation")),
            f"{r['ms']:.3f}" if "ms" in r else "-",
            f"{speedup:.2f}x" if speedup else "-",
            f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-",
            note,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=["qkv_projection", "attention"])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py times CUDA kernels and needs a CUDA device.", file=sys.stderr)
        return 2
    records: list[dict] = []
    bandwidth = copy_bandwidth()
    print(f"{versions()}  copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    for dtype_name in args.dtypes:
        for batch in args.batches:
            if "qkv_projection" in args.ops:
                for key in CONV_SHAPES:
                    bench_conv(batch, DTYPES[dtype_name], key, bandwidth, records)
            if "attention" in args.ops:
                for key in ATTENTION_SHAPES:
                    bench_attention(batch, DTYPES[dtype_name], key, records)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"copy_bandwidth_bytes_per_s": bandwidth, **versions(), "records": records}
        (args.out / "kernels.json").write_text(json.dumps(payload, indent=1) + "\n")
        (args.out / "kernels.md").write_text(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
