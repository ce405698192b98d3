"""Throughput benchmark (`cvt-fast bench`): cvt_fast against transformers and the engines, every speed printed
beside its error. Each case (model, image size, batch, dtype) builds one random-weight model (BatchNorm statistics
randomised too) and gives the same weights and inputs to every contender (cvt_fast.tools.contenders names them). The
reference is the float32 eager model (transformers' when it can run the config, else cvt_fast's); ref64_err is the
reference's own distance from float64. On CUDA, times are medians of triton.testing.do_bench; on the CPU the
contenders run interleaved, round after round, and the median is taken.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import preset_named
from ..errors import Refused
from ..timing import interleaved
from .contenders import (
    BASELINE,
    ENGINES,
    FROZEN,
    THROUGHPUT,
    THROUGHPUT_CPU_DEFAULT,
    THROUGHPUT_GPU_DEFAULT,
    WITH_CVT_FAST,
)
from .engines import INSTALL, Engines, installed, openvino_native_bfloat16
from .models import random_model, transformers_twin
from .reporting import (
    DTYPES,
    check_models,
    cpu_description,
    cpu_native_bfloat16,
    device_name,
    markdown_table,
    progress_printer,
    pyplot,
    quiet_transformers,
    save_figure,
    versions,
    write_records,
)

IMPLEMENTATIONS = THROUGHPUT


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
    compile_s: float | None = None  # torch.compile, freezing or CUDA graph capture, first call included; not timed
    threads: int | None = None  # CPU threads of every contender (torch's; ONNX Runtime's and OpenVINO's set alike)
    rel_err: float | None = None  # max_err relative to the largest reference logit
    rule: str | None = None  # "pass" or "FAIL": rel_err against its dtype's rule (RULES)
    spread: float | None = None  # CPU: (slowest - fastest) / median of the per-round times


# The numerics rule each contender's logits are held to, relative to the largest float32 reference logit: float32
# within 2e-5 of transformers; a half precision within twice the eager path's own error in that dtype plus a floor.
FLOAT32_RULE = 2e-5
HALF_FLOOR = {"float16": 1e-3, "bfloat16": 1e-2}
# The eager path in a half precision, like for like (weights cast), whose error sets the allowance; first found wins.
EAGER_IN_DTYPE = ("cvt_fast-eager", "transformers-eager-cast", "transformers-eager")


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


def _contender(
    name: str, model_name: str, base, dtype: torch.dtype, device: torch.device, x: torch.Tensor, engines: Engines
) -> Callable:
    """pixel_values -> logits, for one implementation."""
    if name == "openvino-transformers":
        fn = engines.openvino_transformers(model_name, transformers_twin(base).eval(), x, dtype)
    elif name.startswith("transformers"):
        cast = name.endswith("-cast")
        model = transformers_twin(base).eval().to(device=device, dtype=dtype if cast else torch.float32)
        autocast = dtype != torch.float32 and not cast

        def run(x, model=model):
            with torch.autocast(device.type, dtype=dtype) if autocast else contextlib.nullcontext():
                return model(x if cast else x.float()).logits

        # Static shapes: compiled once for this shape, never recompiled as "dynamic" after a change of shape.
        fn = torch.compile(run, dynamic=False) if name.endswith("compile") else run
    elif name == "onnxruntime-transformers":
        fn = engines.onnxruntime_transformers(model_name, transformers_twin(base), x)
    elif name in FROZEN:
        frozen = engines.frozen(model_name, base, x, FROZEN[name])

        def fn(x, frozen=frozen):
            return frozen(x).logits

        fn.frozen = frozen  # what it built, for its record
    else:
        model = copy.deepcopy(base).to(device=device, dtype=dtype)
        model.set_backend("eager" if name.startswith("cvt_fast-eager") else "triton")

        def run(x, model=model):
            return model(x).logits

        fn = torch.compile(run, fullgraph=True, dynamic=False) if name.endswith("compile") else run
        if name.endswith("cudagraph"):
            fn = _cuda_graphed(run, x)
    return fn


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
        return logits(transformers_twin(base).eval().to(device)), None
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
    engines: Engines | None = None,
) -> list[Record]:
    """One case, every implementation; on_record(record) as soon as a record is timed (on CUDA, after each
    contender's timing, before the case's rules are known: the returned records carry them; on the CPU, where the
    contenders run interleaved, at the end, rules included). `engines` keeps what was built for earlier cases."""
    engines = engines if engines is not None else Engines()
    dtype = DTYPES[dtype_name]
    found = versions()
    generator = torch.Generator().manual_seed(0)
    base = random_model(model_name, generator)  # a preset name or a config file
    config = base.config
    pixel_values = torch.randn(batch, config.num_channels, image_size, image_size, generator=generator)

    progress(f"{model_name} {image_size}px batch {batch} {dtype_name}: references")
    reference, reference_note = _reference_logits(base, pixel_values, device)
    with torch.inference_mode():  # how far float32 itself is from float64, on a couple of images
        reference64 = copy.deepcopy(base).double()(pixel_values[:2].double()).logits
    ref64_err = (reference[:2] - reference64).abs().max().item()
    reference_scale = max(reference.abs().max().item(), 1e-30)

    x = pixel_values.to(device=device, dtype=dtype)
    inputs = _input_sets(x)
    contenders, records = {}, {}

    def record(name, **fields):
        records[name] = Record(
            device=device_name(device),
            torch_version=found["torch"],
            triton_version=found["triton"],
            transformers_version=found["transformers"],
            model=model_name,
            image_size=image_size,
            batch=batch,
            dtype=dtype_name,
            implementation=name,
            threads=torch.get_num_threads() if device.type == "cpu" else None,
            ref64_err=ref64_err,
            **{"images_per_s": None, "ms_per_batch": None, "peak_mem_bytes": None, "max_err": None, **fields},
        )
        if records[name].note is None:
            records[name].note = reference_note

    def final(name):
        if on_record is not None:
            on_record(records[name])

    for name in implementations:
        if not _applies(name, dtype, device):
            continue
        progress(f"{model_name} {image_size}px batch {batch} {dtype_name}: preparing {name}")
        try:
            fn, fields = _prepared(name, model_name, base, dtype, device, x, engines)
            err = (fields.pop("logits").double().cpu() - reference).abs().max().item()
            record(name, max_err=err, rel_err=err / reference_scale, **fields)  # NaN where a logit is not finite
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

    if device.type == "cpu" and contenders:
        with torch.inference_mode():  # each contender has been called twice already: warm
            timings = interleaved(
                {name: lambda r, fn=fn: fn(inputs[r % len(inputs)]) for name, fn in contenders.items()},
                rounds,
                progress=lambda r: progress(
                    f"{model_name} {image_size}px batch {batch} {dtype_name}: round {r + 1}/{rounds}"
                ),
            )
        for name, timing in timings.items():
            records[name].ms_per_batch, records[name].images_per_s = timing.seconds * 1e3, batch / timing.seconds
            records[name].spread = timing.spread
    for r in records.values():  # every error is known now, the eager path's in this dtype among them
        if r.rel_err is not None:
            r.rule = _rule(dtype_name, r.rel_err, records)
    if device.type == "cpu":
        for name in contenders:
            final(name)
    return [records[name] for name in implementations if name in records]


def _applies(name: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a contender runs in this dtype on this device (and differs from another that does)."""
    if name == "transformers-eager-cast":
        return dtype != torch.float32  # in float32, the same as transformers-eager
    if "onnxruntime" in name:
        return dtype == torch.float32 and device.type == "cpu"  # float32 graphs, on ONNX Runtime's CPU provider
    if name in FROZEN or name == "openvino-transformers":  # made for the CPU, in float32 or bfloat16
        if dtype not in (torch.float32, torch.bfloat16) or device.type != "cpu":
            return False
    if "openvino" in name:
        from ..cpu_target import this_cpu
        from ..frozen.engines import openvino as openvino_engine

        if openvino_engine.cannot_compute(dtype, this_cpu()) is not None:  # a oneDNN cap OpenVINO crashed under, say
            return False
        if dtype == torch.bfloat16:
            return openvino_native_bfloat16()  # else OpenVINO would run float32 under a bfloat16 label
    return True


def _prepared(name, model_name, base, dtype, device, x, engines) -> tuple[Callable, dict]:
    """The contender, called twice (the first call compiles: torch.compile, Triton's JIT), and what those calls
    showed: its logits, compile time, steady-state peak memory on CUDA, and a note."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocated_before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn = _contender(name, model_name, base, dtype, device, x, engines)
    with torch.inference_mode():
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - start if name.endswith(("compile", "cudagraph")) else None
    frozen = getattr(fn, "frozen", None)
    if frozen is not None:  # compiled once, perhaps for an earlier case: its own compile time
        compile_s = frozen.info.compile_s
    peak = None
    if device.type == "cuda":  # a steady-state call: weights, graph pools and its own activations
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        logits = fn(x)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - allocated_before
    note = "the float32 reference" if name == "transformers-eager" and dtype == torch.float32 else None
    if frozen is not None:
        streams = frozen.info.settings.get("streams", 1)
        shared = f"one package for batches 1 to {frozen.batch_size}" if frozen.info.dynamic_batch else None
        note = ", ".join(part for part in (shared, f"{streams} streams" if streams > 1 else None) if part) or None
    if not torch.isfinite(logits).all():
        logits = torch.full_like(logits, float("nan"))  # the error is then NaN, whatever the finite logits say
    return fn, dict(logits=logits, peak_mem_bytes=peak, note=note, compile_s=compile_s)


def _rule(dtype_name: str, rel_err: float, records: dict[str, Record]) -> str:
    """ "pass" or "FAIL" for a relative error: FLOAT32_RULE in float32; in a half precision twice the eager path's
    error in that dtype (EAGER_IN_DTYPE, from the same case; without one, only the floor) plus HALF_FLOOR."""
    if dtype_name == "float32":
        allowed = FLOAT32_RULE
    else:
        eager = next((records[n].rel_err for n in EAGER_IN_DTYPE if n in records and records[n].rel_err), 0.0)
        allowed = 2 * eager + HALF_FLOOR[dtype_name]
    return "pass" if rel_err <= allowed else "FAIL"  # a NaN error fails


# ---- reporting ----------------------------------------------------------------------------------------------


def records_table(records: list[Record], baseline: str = BASELINE) -> str:
    """bench.md: a row per record, its speed against the baseline of its case."""
    header = ["model", "size", "batch", "dtype", "group", "implementation", "images/s", "spread", f"vs {baseline}",
              "peak MiB", "max err", "rel err", "rule", "compile s"]  # fmt: skip
    by_case: dict[tuple, dict[str, Record]] = {}
    for r in records:
        by_case.setdefault((r.model, r.image_size, r.batch, r.dtype), {})[r.implementation] = r
    rows = []
    for r in records:
        base = by_case[(r.model, r.image_size, r.batch, r.dtype)].get(baseline)
        speed = f"{r.images_per_s:.1f}" if r.images_per_s else (f"error: {r.error}" if r.error else "-")
        ratio = f"{r.images_per_s / base.images_per_s:.2f}x" if r.images_per_s and base and base.images_per_s else "-"
        mem = f"{r.peak_mem_bytes / 2**20:.0f}" if r.peak_mem_bytes else "-"
        compile_s = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
        spread = f"{r.spread:.0%}" if r.spread is not None else "-"
        rel = f"{r.rel_err:.1e}" if r.rel_err is not None else "-"
        group = "cvt_fast" if r.implementation in WITH_CVT_FAST else "without cvt_fast"
        rows.append((r.model, r.image_size, r.batch, r.dtype, group, r.implementation, speed, spread, ratio, mem,
                     _error_text(r) or "-", rel, r.rule or "-", compile_s))  # fmt: skip
    return markdown_table(header, rows)


def _error_text(r: Record, prefix: str = "") -> str:
    """The max error and, in brackets, the note on what it was measured against, whichever exist."""
    parts = [f"{prefix}{r.max_err:.1e}" if r.max_err is not None else "", f"({r.note})" if r.note else ""]
    return " ".join(part for part in parts if part)


def plot(records: list[Record], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
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
    save_figure(plt, fig, path)
    return True


def write_results(records: list[Record], out_dir: Path) -> list[Path]:
    """bench.json, bench.md and (with matplotlib) bench.png in out_dir; the paths written."""
    written = write_records(out_dir, "bench", records, records_table(records), lambda path: plot(records, path))
    if (out_dir / "bench.jsonl").exists():  # written record by record while the run went on
        written.insert(0, out_dir / "bench.jsonl")
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
    from ..kernels.launch import TRITON_INTERPRET

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
    progress = progress_printer(len(cases))
    records: list[Record] = []
    # What an engine builds for a model serves its every case; the frozen engines are built together, for each dtype.
    engines = Engines(batches, [FROZEN[name] for name in implementations if name in FROZEN])
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
        with quiet_transformers():
            case_records = bench_case(
                model, size, batch, dtype, implementations, device, rounds, progress, on_record, engines
            )
        records.extend(case_records)
        progress.clear()  # type: ignore[attr-defined]
        for r in case_records:
            print(f"{model} {size}px batch {batch:>3} {dtype:>8}  {_contender_line(r)}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out_dir is not None:
        written = write_results(records, out_dir)
        print(f"results written to {', '.join(map(str, written))}")
        if out_dir / "bench.png" not in written:
            print(f"no {out_dir / 'bench.png'}: the plot needs matplotlib (pip install matplotlib)")
    else:
        print("results not saved (--out DIR writes bench.json, bench.md and bench.png)")
    return records


def _contender_line(r: Record) -> str:
    """One contender of a case: speed and its spread between rounds, error and its rule, compile time apart."""
    if not r.images_per_s:
        return f"{r.implementation:<28} error: {r.error}" if r.error else f"{r.implementation:<28} -"
    spread = f" ±{r.spread / 2:.0%}" if r.spread is not None else ""
    rule = f" [{r.rule}]" if r.rule else ""
    compile_s = f"  (compile {r.compile_s:.1f} s)" if r.compile_s is not None else ""
    speed = f"{r.images_per_s:8.1f} images/s{spread:<5}"
    return f"{r.implementation:<28} {speed}  {_error_text(r, 'max err ')}{rule}{compile_s}"


# ---- what a run measures ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one run of the benchmark measures, and the notes on what was left out and why."""

    device: torch.device
    models: list[str]
    sizes: list[int] | None  # None: each model's own size (a preset's, else 224)
    batches: list[int]
    dtypes: list[str]
    implementations: list[str]
    notes: list[str]


def plan(
    device: torch.device,
    *,
    models: list[str] | None = None,
    sizes: list[int] | None = None,
    batches: list[int] | None = None,
    dtypes: list[str] | None = None,
    implementations: list[str] | None = None,
) -> Plan:
    """What was asked, else this device's defaults. On a GPU every CvT at 224 and 384 px, batches 1 to 256, in
    bfloat16 (the full matrix in every dtype would not fit one sitting); on a CPU cvt-13 at 224 px, batch 1 and 8, in
    float32, and in bfloat16 too where the CPU computes it natively (elsewhere it is emulated, and slow)."""
    on_gpu = device.type == "cuda"
    notes: list[str] = []
    chosen = _implementations(implementations, device, notes)
    models = models or (["cvt-13", "cvt-21", "cvt-w24"] if on_gpu else ["cvt-13"])
    sizes = sizes or ([224, 384] if on_gpu else [224])
    check_models(models, sizes)
    batches = batches or ([1, 8, 64, 256] if on_gpu else [1, 8])
    if not on_gpu:
        notes.append(f"on {cpu_description()}")
    if not dtypes:
        native = None if on_gpu else cpu_native_bfloat16()
        dtypes = ["bfloat16"] if on_gpu else ["float32", "bfloat16"] if native else ["float32"]
        if not on_gpu and not native:
            notes.append("bfloat16 is left out: this CPU has no native bfloat16 (--dtypes bfloat16 runs it emulated)")
    return Plan(device, list(models), list(sizes), list(batches), list(dtypes), chosen, notes)


def _implementations(requested: list[str] | None, device: torch.device, notes: list[str]) -> list[str]:
    import importlib.util

    from ..kernels.launch import TRITON_INTERPRET

    if requested:
        unknown = [name for name in requested if name not in IMPLEMENTATIONS]
        if unknown:
            raise Refused(
                f"argument --implementations: unknown {', '.join(map(repr, unknown))}; "
                f"the implementations are {', '.join(IMPLEMENTATIONS)}"
            )
        chosen = list(dict.fromkeys(requested))
    elif device.type == "cuda":
        chosen = list(THROUGHPUT_GPU_DEFAULT)
    else:  # the CPU's contenders: cvt_fast's eager path, and the engines (the Triton kernels need CUDA)
        chosen = list(THROUGHPUT_CPU_DEFAULT)
        notes.append("note: transformers-compile is left out (a compile per batch and dtype); --implementations adds "
                     "it")  # fmt: skip
    for engine in ENGINES:
        if engine in chosen and not installed(engine):
            if requested:
                raise Refused(f"argument --implementations: {engine} is not installed ({INSTALL[engine]})")
            chosen.remove(engine)
            notes.append(f"note: {engine} is not installed; skipping it ({INSTALL[engine]})")
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
            notes.append(
                f"note: transformers is not installed; skipping {', '.join(dropped)} (pip install transformers)"
            )
    return chosen


def print_summary(records: list[Record], baseline: str = BASELINE) -> None:
    """Per case, what a user came to learn: cvt_fast's fastest contender within its dtype's error rule against the
    fastest without cvt_fast (and the baseline); then every contender outside its rule, named."""
    print()
    cases: dict[tuple, list[Record]] = {}
    for r in records:
        cases.setdefault((r.model, r.image_size, r.batch, r.dtype), []).append(r)
    for (model, size, batch, dtype), case in cases.items():
        print(f"{model} {size}px batch {batch} {dtype}: {summary_line(case, baseline)}")
        for r in case:
            if r.rule == "FAIL":
                print(f"{model} {size}px batch {batch} {dtype}: {r.implementation} is outside the {dtype} rule "
                      f"(relative error {r.rel_err:.1e})")  # fmt: skip


def summary_line(case: list[Record], baseline: str = BASELINE) -> str:
    """One case: cvt_fast's fastest against the fastest without cvt_fast, each within its error rule."""
    correct = [r for r in case if r.images_per_s and r.rule == "pass"]
    ours = [r for r in correct if r.implementation in WITH_CVT_FAST]
    theirs = [r for r in correct if r.implementation not in WITH_CVT_FAST]
    if not correct:
        return "no contender was timed within its rule"
    parts = []
    if ours:
        best = max(ours, key=lambda r: r.images_per_s)
        parts.append(f"cvt_fast's fastest: {best.implementation}, {best.images_per_s:.1f} images/s")
    if theirs:
        other = max(theirs, key=lambda r: r.images_per_s)
        parts.append(f"without cvt_fast: {other.implementation}, {other.images_per_s:.1f}")
    if ours and theirs:
        parts.append(f"{best.images_per_s / other.images_per_s:.2f}x")
        base = next((r for r in theirs if r.implementation == baseline), None)
        if base is not None and base is not other:
            parts.append(f"{best.images_per_s / base.images_per_s:.2f}x {baseline}")
    return "; ".join(parts)
