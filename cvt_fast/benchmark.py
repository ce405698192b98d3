"""Throughput benchmark: cvt_fast against transformers, with every speed printed beside its error.

Each case (model, image size, batch, dtype) builds one random-weight model (BatchNorm statistics randomised too),
gives the same weights to every contender, and times them on the same inputs:

  transformers-eager          transformers' CvtForImageClassification (float32, or autocast float16/bfloat16 over
                              float32 weights, the way transformers users run it in lower precision)
  transformers-eager-cast     the same with its weights cast to the dtype, no autocast: like for like with
                              cvt_fast, whose weights are in the dtype (skipped in float32, where it is the above)
  transformers-compile        the same under torch.compile
  cvt_fast-eager              cvt_fast with backend="eager"
  cvt_fast-eager-compile      the same under torch.compile(fullgraph=True) (the CPU's compiled path)
  cvt_fast-triton             cvt_fast with backend="triton" (CUDA only)
  cvt_fast-triton-compile     the same under torch.compile(fullgraph=True)
  cvt_fast-triton-cudagraph   cvt_fast-triton captured in a CUDA graph (one launch per forward)
  onnxruntime                 ONNX Runtime (CPU) on cvt_fast's float32 ONNX export (float32 cases only)

The reference is the float32 eager model (transformers' when installed, else cvt_fast's); max_err is the largest
absolute logit difference from it, and ref64_err the reference's own distance from float64 (on two images), for
scale. peak_mem_bytes (CUDA) is what a forward allocates on top of what it found, plus the contender's weights.
On CUDA, times are medians of triton.testing.do_bench; on the CPU the contenders run interleaved, round after round,
and the median is taken. Results: JSON records, a markdown table and (with matplotlib) a plot.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import CvtConfig, preset_named
from .errors import Refused
from .modeling import CvtForImageClassification
from .testing import randomize_

IMPLEMENTATIONS = (
    "transformers-eager",
    "transformers-eager-cast",
    "transformers-compile",
    "cvt_fast-eager",
    "cvt_fast-eager-compile",
    "cvt_fast-triton",
    "cvt_fast-triton-compile",
    "cvt_fast-triton-cudagraph",
    "onnxruntime",
)
# What runs when --implementations is not given.
GPU_DEFAULT = (
    "transformers-eager",
    "transformers-eager-cast",
    "transformers-compile",
    "cvt_fast-eager",
    "cvt_fast-triton",
    "cvt_fast-triton-compile",
    "cvt_fast-triton-cudagraph",
)
CPU_DEFAULT = ("transformers-eager", "cvt_fast-eager", "cvt_fast-eager-compile", "onnxruntime")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Record:
    device: str
    torch_version: str
    triton_version: str | None
    transformers_version: str | None
    model: str
    image_size: int
    batch: int
    dtype: str
    implementation: str
    images_per_s: float | None
    ms_per_batch: float | None
    peak_mem_bytes: int | None
    max_err: float | None
    ref64_err: float | None
    error: str | None = None
    note: str | None = None
    compile_s: float | None = None  # torch.compile or CUDA graph capture, first call included; apart from the timing


def _versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except Exception:
            return None

    return {"torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers")}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description()


def cpu_description() -> str:
    """The CPU as every CPU figure names it: its model, PyTorch's kernel capability (AVX2, AVX512, ...), native
    bfloat16 or not, and the threads PyTorch uses."""
    bf16 = cpu_native_bfloat16()
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    capability = torch.backends.cpu.get_cpu_capability()
    native = f"native bfloat16: {bf16}" if bf16 else "no native bfloat16"
    return f"cpu ({name}, {capability}, {native}, {torch.get_num_threads()} threads)"


def _transformers_model(cvt_model: CvtForImageClassification):
    import transformers

    config = transformers.CvtConfig(**{k: v for k, v in cvt_model.config.to_dict().items() if k != "model_type"})
    model = transformers.CvtForImageClassification(config)
    model.load_state_dict(cvt_model.state_dict())
    return model.eval()


def _cuda_graphed(fn: Callable, x: torch.Tensor) -> Callable:
    """fn captured once in a CUDA graph for x's shape: one launch per forward instead of hundreds."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):  # compile the Triton kernels before capture
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_out = fn(static_x)

    def replay(x):
        static_x.copy_(x)
        graph.replay()
        return static_out

    return replay


def _contender(name: str, base, dtype: torch.dtype, device: torch.device, x: torch.Tensor) -> Callable:
    """pixel_values -> logits, for one implementation."""
    if name.startswith("transformers"):
        cast = name.endswith("-cast")
        model = _transformers_model(base).to(device=device, dtype=dtype if cast else torch.float32)
        autocast = dtype != torch.float32 and not cast

        def run(x, model=model):
            with torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext():
                return model(x if cast else x.float()).logits

        # Static shapes: compiled once for this shape, never recompiled as "dynamic" after a change of shape.
        fn = torch.compile(run, dynamic=False) if name.endswith("compile") else run
    elif name == "onnxruntime":
        fn = _onnxruntime(base)
    else:
        model = copy.deepcopy(base).to(device=device, dtype=dtype)
        model.set_backend("eager" if name.startswith("cvt_fast-eager") else "triton")

        def run(x, model=model):
            return model(x).logits

        fn = torch.compile(run, fullgraph=True, dynamic=False) if name.endswith("compile") else run
        if name.endswith("cudagraph"):
            fn = _cuda_graphed(run, x)
    return fn


def _onnxruntime(base) -> Callable:
    """An ONNX Runtime session on cvt_fast's float32 export of `base`, with as many threads as torch uses."""
    import tempfile

    import onnxruntime

    from .export import export_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(base, path, validate=False)  # the benchmark measures the error itself
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.float().numpy()})[0])


def cpu_native_bfloat16() -> str | None:
    """The CPU's native bfloat16 instructions (AMX, AVX-512 BF16), or None where bfloat16 would be emulated (or
    where oneDNN, capped by ONEDNN_MAX_CPU_ISA, will not use them)."""
    from .ops.cpu import cpu_has_native_bfloat16

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    found = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
    return (" and ".join(found) or None) if cpu_has_native_bfloat16() else None


L2_BYTES = 50 * 2**20  # H100's L2; H200 has 60 MiB


def _input_sets(x: torch.Tensor) -> list[torch.Tensor]:
    """Several input batches to rotate through when they would all sit in L2, so that no timed call finds its
    input already cached by the previous one."""
    sets = 4 if x.is_cuda and 4 * x.numel() * x.element_size() <= L2_BYTES else 1
    return [x] + [torch.randn_like(x) for _ in range(sets - 1)]


def _time_cuda(fn: Callable, inputs: list[torch.Tensor]) -> float:
    import triton.testing

    rotation = itertools.cycle(inputs)
    return float(triton.testing.do_bench(lambda: fn(next(rotation)), warmup=50, rep=300, return_mode="median"))


def _reference_logits(
    base, pixel_values: torch.Tensor, device: torch.device, chunk: int = 16
) -> tuple[torch.Tensor, str | None]:
    """float32 eager logits, a few images at a time to bound memory: transformers' when it is installed and can run
    the config (it crashes on some that cvt_fast runs, such as a stage no deeper than its index), else cvt_fast's
    own eager model, with a note saying so."""

    def logits(model):
        with torch.inference_mode():
            return torch.cat([model(part.to(device)).logits.double().cpu() for part in pixel_values.split(chunk)])

    try:
        return logits(_transformers_model(base).to(device)), None
    except ImportError:
        note = "errors against cvt_fast eager float32 (transformers is not installed)"
    except Exception as error:  # noqa: BLE001 - whatever transformers raises on a config it cannot run
        note = f"errors against cvt_fast eager float32: transformers cannot run this config ({type(error).__name__})"
    return logits(copy.deepcopy(base).to(device)), note


def bench_case(
    model_name: str,
    image_size: int,
    batch: int,
    dtype_name: str,
    implementations: list[str],
    device: torch.device,
    rounds: int,
    progress: Callable[[str], None],
    on_record: Callable[[Record], None] | None = None,
) -> list[Record]:
    """One case, every implementation; on_record(record) as soon as a record is final (on CUDA, after each
    contender's timing; on the CPU, where the contenders run interleaved, at the end)."""
    dtype = DTYPES[dtype_name]
    versions = _versions()
    generator = torch.Generator().manual_seed(0)
    config = CvtConfig.from_pretrained(model_name)  # a preset name or a config file
    base = randomize_(CvtForImageClassification(config, backend="eager").eval(), generator)
    pixel_values = torch.randn(batch, config.num_channels, image_size, image_size, generator=generator)

    progress(f"{model_name} {image_size}px batch {batch} {dtype_name}: references")
    reference, reference_note = _reference_logits(base, pixel_values, device)
    with torch.inference_mode():  # how far float32 itself is from float64, on a couple of images
        reference64 = copy.deepcopy(base).double()(pixel_values[:2].double()).logits
    ref64_err = (reference[:2] - reference64).abs().max().item()

    x = pixel_values.to(device=device, dtype=dtype)
    inputs = _input_sets(x)
    contenders, records = {}, {}

    def record(name, **fields):
        records[name] = Record(
            device=_device_name(device),
            torch_version=versions["torch"],
            triton_version=versions["triton"],
            transformers_version=versions["transformers"],
            model=model_name,
            image_size=image_size,
            batch=batch,
            dtype=dtype_name,
            implementation=name,
            ref64_err=ref64_err,
            **{"images_per_s": None, "ms_per_batch": None, "peak_mem_bytes": None, "max_err": None, **fields},
        )
        if records[name].note is None:
            records[name].note = reference_note

    def final(name):
        if on_record is not None:
            on_record(records[name])

    for name in implementations:
        if name == "transformers-eager-cast" and dtype == torch.float32:
            continue  # the same as transformers-eager
        if name == "onnxruntime" and (dtype != torch.float32 or device.type != "cpu"):
            continue  # the export is float32, and runs on ONNX Runtime's CPU provider
        progress(f"{model_name} {image_size}px batch {batch} {dtype_name}: preparing {name}")
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                allocated_before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn = _contender(name, base, dtype, device, x)
            with torch.inference_mode():  # the first call compiles (torch.compile, Triton's JIT)
                fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compiled = name.endswith(("compile", "cudagraph"))
            compile_s = time.perf_counter() - start if compiled else None
            peak = None
            if device.type == "cuda":  # a steady-state call: weights, graph pools and its own activations
                torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode():
                logits = fn(x)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - allocated_before
            err = (logits.double().cpu() - reference).abs().max().item()
            note = "the float32 reference" if name == "transformers-eager" and dtype == torch.float32 else None
            record(name, max_err=err, peak_mem_bytes=peak, note=note, compile_s=compile_s)
            contenders[name] = fn
        except Exception as error:  # one contender failing (out of memory, say) must not stop the rest
            record(name, error=f"{type(error).__name__}: {error}".splitlines()[0][:300])
            final(name)
            continue
        if device.type == "cuda":  # timed alone, then released: contenders need not fit in memory together
            progress(f"{model_name} {image_size}px batch {batch} {dtype_name}: timing {name}")
            with torch.inference_mode():
                ms = _time_cuda(contenders.pop(name), inputs)
            records[name].ms_per_batch, records[name].images_per_s = ms, batch / ms * 1e3
            final(name)
            torch.cuda.empty_cache()

    if device.type == "cpu" and contenders:  # interleaved rounds: drift on a shared machine hits all alike
        times: dict[str, list[float]] = {name: [] for name in contenders}
        with torch.inference_mode():  # each contender has been called twice already: warm
            for r in range(rounds):
                progress(f"{model_name} {image_size}px batch {batch} {dtype_name}: round {r + 1}/{rounds}")
                for name, fn in contenders.items():
                    start = time.perf_counter()
                    fn(inputs[r % len(inputs)])
                    times[name].append(time.perf_counter() - start)
        for name, samples in times.items():
            seconds = statistics.median(samples)
            records[name].ms_per_batch, records[name].images_per_s = seconds * 1e3, batch / seconds
            final(name)
    return [records[name] for name in implementations if name in records]


# ---- reporting ----------------------------------------------------------------------------------------------


def markdown_table(records: list[Record], baseline: str = "transformers-eager") -> str:
    lines = [
        "| model | size | batch | dtype | implementation | images/s | vs " + baseline + " | peak MiB | max err "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case: dict[tuple, dict[str, Record]] = {}
    for r in records:
        by_case.setdefault((r.model, r.image_size, r.batch, r.dtype), {})[r.implementation] = r
    for r in records:
        base = by_case[(r.model, r.image_size, r.batch, r.dtype)].get(baseline)
        speed = f"{r.images_per_s:.1f}" if r.images_per_s else (f"error: {r.error}" if r.error else "-")
        ratio = f"{r.images_per_s / base.images_per_s:.2f}x" if r.images_per_s and base and base.images_per_s else "-"
        mem = f"{r.peak_mem_bytes / 2**20:.0f}" if r.peak_mem_bytes else "-"
        err = _error_text(r) or "-"
        compile_s = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
        cells = (r.model, r.image_size, r.batch, r.dtype, r.implementation, speed, ratio, mem, err, compile_s)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _error_text(r: Record, prefix: str = "") -> str:
    """The max error and, in brackets, the note on what it was measured against, whichever exist."""
    parts = [f"{prefix}{r.max_err:.1e}" if r.max_err is not None else "", f"({r.note})" if r.note else ""]
    return " ".join(part for part in parts if part)


def plot(records: list[Record], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = sorted({(r.model, r.image_size, r.dtype) for r in records})
    fig, axes = plt.subplots(len(cases), 1, figsize=(10, 3.2 * len(cases)), squeeze=False)
    for ax, (model, size, dtype) in zip(axes[:, 0], cases, strict=True):
        subset = [r for r in records if (r.model, r.image_size, r.dtype) == (model, size, dtype) and r.images_per_s]
        batches = sorted({r.batch for r in subset})
        names = [n for n in IMPLEMENTATIONS if any(r.implementation == n for r in subset)]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = [
                next((r.images_per_s for r in subset if r.batch == b and r.implementation == name), 0) for b in batches
            ]
            ax.bar([j + i * width for j in range(len(batches))], values, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel("images/s")
        ax.set_title(f"{model} {size}px {dtype}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _progress_printer(total: int, stream=None) -> Callable[[str], None]:
    """One self-overwriting status line on a terminal; elsewhere (a log file, a pipe, CI) one plain line per step
    with the time so far, so that a long run shows in its log where it is."""
    stream = stream if stream is not None else sys.stderr
    state = {"case": 0}
    live = stream.isatty()
    start = time.monotonic()

    def progress(message: str) -> None:
        if live:
            print(f"\r\033[K[{state['case']}/{total}] {message}", end="", file=stream, flush=True)
        else:
            print(f"[{state['case']}/{total}, {time.monotonic() - start:.0f}s] {message}", file=stream, flush=True)

    progress.state = state  # type: ignore[attr-defined]
    progress.clear = lambda: live and print("\r\033[K", end="", file=stream)  # type: ignore[attr-defined]
    return progress


def write_results(records: list[Record], out_dir: Path) -> list[Path]:
    """bench.json, bench.md and (with matplotlib) bench.png in out_dir; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    (out_dir / "bench.md").write_text(markdown_table(records))
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    if (out_dir / "bench.jsonl").exists():  # written record by record while the run went on
        written.insert(0, out_dir / "bench.jsonl")
    if plot(records, out_dir / "bench.png"):
        written.append(out_dir / "bench.png")
    return written


def run(
    models: list[str],
    sizes: list[int] | None,
    batches: list[int],
    dtypes: list[str],
    implementations: list[str],
    device: torch.device,
    rounds: int = 5,
    out_dir: Path | None = None,
) -> list[Record]:
    from .kernels.launch import TRITON_INTERPRET

    unknown = [name for name in implementations if name not in IMPLEMENTATIONS]
    if unknown:  # an unknown name would otherwise be timed as cvt_fast with the Triton backend
        raise ValueError(f"unknown implementations {unknown}; expected some of {IMPLEMENTATIONS}")
    if TRITON_INTERPRET and any("triton" in name for name in implementations):
        raise Refused("TRITON_INTERPRET=1 is set: timings of kernels under the Triton interpreter mean nothing")
    cases = [
        (model, size, batch, dtype)
        for model in models
        for size in (sizes or [getattr(preset_named(model), "image_size", 224)])  # 224 for a config file
        for batch in batches
        for dtype in dtypes
    ]
    progress = _progress_printer(len(cases))
    records: list[Record] = []
    on_record = None
    if out_dir is not None:  # every record appended the moment it is final: a run stopped midway keeps them
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / "bench.jsonl"
        partial.write_text("")

        def on_record(record: Record) -> None:
            with partial.open("a") as f:
                f.write(json.dumps(asdict(record)) + "\n")

    for index, (model, size, batch, dtype) in enumerate(cases, 1):
        progress.state["case"] = index  # type: ignore[attr-defined]
        case_records = bench_case(model, size, batch, dtype, implementations, device, rounds, progress, on_record)
        records.extend(case_records)
        progress.clear()  # type: ignore[attr-defined]
        for r in case_records:
            speed = f"{r.images_per_s:8.1f} images/s" if r.images_per_s else f"error: {r.error}"
            err = _error_text(r, prefix="max err ")
            compile_s = f"  (compile {r.compile_s:.1f} s)" if r.compile_s is not None else ""
            print(
                f"{model} {size}px batch {batch:>3} {dtype:>8}  {r.implementation:<24} {speed}  {err}{compile_s}",
                flush=True,
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out_dir is not None:
        written = write_results(records, out_dir)
        print(f"results written to {', '.join(map(str, written))}")
        if out_dir / "bench.png" not in written:
            print(f"no {out_dir / 'bench.png'}: the plot needs matplotlib (pip install matplotlib)")
    return records
