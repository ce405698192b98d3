"""Memory and time against image size (`cvt-fast bench --resolutions 224 512 1024 2048`): one forward pass per
size (batch 1, random weights), smallest first, for each implementation and dtype, with the max logit error against
the float32 reference beside each point. On the CPU each point runs in a fresh process (`python -m
cvt_fast.tools.resolution --worker`) whose peak resident memory during the forward is measured, and a watchdog stops a
point that passes the memory cap; on a GPU, torch.cuda.max_memory_allocated. A point out of memory (or over the cap)
is recorded as such and larger sizes of that contender are not tried.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import Refused
from .contenders import RESOLUTION, RESOLUTION_CPU_DEFAULT, RESOLUTION_GPU_DEFAULT
from .engines import installed
from .models import random_model, transformers_twin
from .reporting import (
    DTYPES,
    check_models,
    cpu_peak_bytes,
    device_name,
    markdown_table,
    pyplot,
    save_figure,
    status_kib,
    write_records,
)

IMPLEMENTATIONS = RESOLUTION
# How a CPU allocation failure reads in a worker's stderr (PyTorch's allocator, C++, Python).
OUT_OF_MEMORY_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "bad_alloc",
    "memoryerror",
)


@dataclass
class Point:
    device: str
    model: str
    implementation: str
    dtype: str
    resolution: int
    pixels: int
    status: str  # "ok", "out of memory", "over the memory cap (N GiB)", "skipped: ...", "error: ..."
    seconds: float | None = None
    peak_mem_bytes: int | None = None
    max_err: float | None = None  # max |logits - float32 reference| at this size
    reference: str | None = None


# ---- one forward pass ---------------------------------------------------------------------------------------


def build(model_name: str, implementation: str, dtype: torch.dtype, device: torch.device, onnx_path: str | None = None):
    """The contender as a function of pixel_values -> logits, on `device` in `dtype`, random weights (seed 0).
    onnxruntime runs the float32 export at onnx_path (made once by the parent: see run)."""
    base = random_model(model_name)
    config = base.config
    if implementation == "onnxruntime":
        from .engines import onnxruntime_session

        session = onnxruntime_session(onnx_path)
        return lambda x: torch.from_numpy(
            session.run(None, {"pixel_values": x.float().numpy()})[0]
        ), config.num_channels
    if implementation == "transformers":
        model = transformers_twin(base)
    else:
        model = base
        model.set_backend("eager" if implementation == "cvt_fast-eager" else "triton")
    model = model.eval().to(device=device, dtype=dtype)
    return lambda x: model(x).logits, config.num_channels


def image(num_channels: int, size: int) -> torch.Tensor:
    return torch.randn(1, num_channels, size, size, generator=torch.Generator().manual_seed(size))


def _timed(fn: Callable[[], object], budget_s: float = 2.0, at_most: int = 3) -> float:
    """Median seconds of fn() over up to `at_most` calls, stopping once `budget_s` is spent (at 2048 px a CPU
    forward takes seconds)."""
    times: list[float] = []
    while len(times) < at_most and sum(times) < budget_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def worker(spec: dict) -> dict:
    """One CPU point, in its own process: build, warm up small, then a first forward at the size (its peak
    resident memory over what the process held before it), then the timed ones."""
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    torch.manual_seed(0)
    fn, channels = build(spec["model"], spec["implementation"], DTYPES[spec["dtype"]], torch.device("cpu"),
                         spec.get("onnx_path"))  # fmt: skip
    dtype = DTYPES[spec["dtype"]]
    x = image(channels, spec["resolution"]).to(dtype)
    with torch.inference_mode():
        fn(image(channels, 64).to(dtype))  # thread pools, first-call setup
        logits, peak = cpu_peak_bytes(lambda: fn(x))
        seconds = _timed(lambda: fn(x))
    torch.save(logits.double(), spec["logits_path"])
    return {"seconds": seconds, "peak_mem_bytes": peak}


def _run_worker(spec: dict, cap_bytes: int, timeout_s: float) -> tuple[dict | None, str]:
    """(result, status): the worker in a fresh process, killed if its resident memory passes the cap."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cvt_fast.tools.resolution", "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    over_cap = threading.Event()

    def watch():
        while process.poll() is None:
            rss = status_kib("VmRSS", process.pid)
            if rss is not None and rss * 1024 > cap_bytes:
                over_cap.set()
                process.kill()
                return
            time.sleep(0.02)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return None, f"error: over the {timeout_s:.0f} s time limit"
    watchdog.join()
    if over_cap.is_set():
        return None, f"over the memory cap ({cap_bytes / 2**30:.1f} GiB)"
    if process.returncode != 0:
        said = err.lower()
        if process.returncode == -9 or any(m in said for m in OUT_OF_MEMORY_MESSAGES):  # -9: the kernel's OOM killer
            return None, "out of memory"
        return None, "error: " + (err.strip().splitlines() or [f"exit status {process.returncode}"])[-1][:300]
    return json.loads(out.strip().splitlines()[-1]), "ok"


def _gpu_point(fn: Callable, channels: int, size: int, dtype: torch.dtype, device: torch.device, cap_bytes: int):
    """(result, status, logits) of one GPU point: the forward's peak allocation over what was allocated before,
    and the median of three timed forwards."""
    x = image(channels, size).to(device, dtype)
    try:
        with torch.inference_mode():
            fn(image(channels, 64).to(device, dtype))  # first-call setup (Triton's JIT, cuDNN plans) outside
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                logits = fn(x)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated(device) - before
    except torch.cuda.OutOfMemoryError:
        return None, "out of memory", None
    finally:
        torch.cuda.empty_cache()
    if peak > cap_bytes:
        return None, f"over the memory cap ({cap_bytes / 2**30:.1f} GiB)", None
    return {"seconds": sorted(times)[1], "peak_mem_bytes": peak}, "ok", logits.double().cpu()


# ---- the sweep ----------------------------------------------------------------------------------------------


def default_cap_bytes() -> int:
    """60% of the memory available now (CPU), or of the GPU's memory; 8 GiB where neither can be read."""
    if torch.cuda.is_available():
        return int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(0.6 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 8 * 2**30


def _contender_points(model, implementation, dtype, resolutions, device, cap_bytes, scratch, timeout_s, progress):
    """(point, logits) for each size in turn; after one runs out of memory or over the cap, the rest are skipped."""
    device_label = device_name(device)
    onnx_path = None
    if implementation == "onnxruntime":
        if device.type != "cpu" or dtype != "float32":  # the export is float32, ONNX Runtime's provider the CPU
            return
        from ..export import export_onnx

        onnx_path = str(Path(scratch) / f"model-{hashlib.sha256(model.encode()).hexdigest()[:12]}.onnx")
        if not Path(onnx_path).exists():
            progress(f"{model}: exporting to ONNX for onnxruntime")
            export_onnx(random_model(model), onnx_path, validate=False)  # the points measure the error
    gpu_model = None
    if device.type == "cuda":  # one model for every size (a CPU point builds its own, in its own process)
        gpu_model = build(model, implementation, DTYPES[dtype], device)
    stopped = None
    for size in resolutions:
        point = Point(device_label, model, implementation, dtype, size, size * size, "ok")
        if stopped:
            point.status = f"skipped: {stopped}"
            yield point, None
            continue
        progress(f"{model} {implementation} {dtype} {size}px")
        if gpu_model is not None:
            result, point.status, logits = _gpu_point(*gpu_model, size, DTYPES[dtype], device, cap_bytes)
        else:
            spec = dict(model=model, implementation=implementation, dtype=dtype, resolution=size, onnx_path=onnx_path,
                        threads=torch.get_num_threads())  # fmt: skip
            spec["logits_path"] = str(Path(scratch) / f"{implementation}-{dtype}-{size}.pt")
            result, point.status = _run_worker(spec, cap_bytes, timeout_s)
            logits = torch.load(spec["logits_path"]) if result else None
        if result:
            point.seconds, point.peak_mem_bytes = result["seconds"], result["peak_mem_bytes"]
        elif not point.status.startswith("error"):  # out of memory, over the cap: larger sizes would be too
            stopped = f"{point.status} at {size}px"
        yield point, logits


def run(
    models: list[str],
    resolutions: list[int],
    dtypes: list[str],
    implementations: list[str],
    device: torch.device,
    cap_bytes: int,
    out_dir: Path | None = None,
    progress: Callable[[str], None] = print,
    timeout_s: float = 1800,
    jsonl: Path | None = None,
) -> list[Point]:
    """Every (model, implementation, dtype) from the smallest size up; the float32 reference of each size is the
    first float32 contender that ran there (transformers goes first). Each point is appended to `jsonl` (default
    out_dir/resolution.jsonl) as it is measured; out_dir also gets resolution.json, .md and .png at the end."""
    resolutions = sorted(set(resolutions))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        jsonl = jsonl or out_dir / "resolution.jsonl"
    if jsonl is not None:
        jsonl.write_text("")
    points: list[Point] = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            references: dict[int, tuple[str, torch.Tensor]] = {}  # size -> (name, float32 logits)
            for implementation in sorted(implementations, key=lambda n: n != "transformers"):
                for dtype in sorted(dtypes, key=lambda d: d != "float32"):
                    for point, logits in _contender_points(
                        model, implementation, dtype, resolutions, device, cap_bytes, scratch, timeout_s, progress
                    ):
                        if logits is not None and dtype == "float32" and point.resolution not in references:
                            references[point.resolution] = (f"{implementation} float32", logits)
                            point.reference = "(the reference)"
                        elif logits is not None and point.resolution in references:
                            point.reference, reference = references[point.resolution]
                            point.max_err = (logits - reference).abs().max().item()
                        points.append(point)
                        if jsonl is not None:
                            with jsonl.open("a") as f:
                                f.write(json.dumps(asdict(point)) + "\n")
                        if not point.status.startswith("skipped"):
                            progress(describe(point))
    if out_dir is not None:
        write_records(out_dir, "resolution", points, markdown(points), lambda path: plot(points, path))
    return points


def describe(p: Point) -> str:
    where = f"{p.model} {p.implementation} {p.dtype} {p.resolution}px"
    if p.status != "ok":
        return f"{where}: {p.status}"
    mem = f"{p.peak_mem_bytes / 2**30:.2f} GiB" if p.peak_mem_bytes is not None else "? GiB"
    err = f", max err {p.max_err:.1e} vs {p.reference}" if p.max_err is not None and p.reference else ""
    return f"{where}: {p.seconds:.2f} s, +{mem}{err}"


def markdown(points: list[Point]) -> str:
    rows = []
    for p in points:
        if p.status == "ok":
            mem = f"+{p.peak_mem_bytes / 2**30:.2f} GiB" if p.peak_mem_bytes is not None else "-"
            err = f"{p.max_err:.1e}" if p.max_err is not None else "-"
            rows.append([p.model, p.implementation, p.dtype, p.resolution, f"{p.seconds:.2f} s", mem, err, p.reference])
        else:
            rows.append([p.model, p.implementation, p.dtype, p.resolution, p.status, "-", "-", "-"])
    header = ["model", "implementation", "dtype", "size", "time", "peak memory", "max err", "reference"]
    return markdown_table(header, rows)


def plot(points: list[Point], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (memory, seconds) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(p.model, p.implementation, p.dtype) for p in points}):
        ok = [p for p in points if (p.model, p.implementation, p.dtype) == key and p.status == "ok"]
        if not ok:
            continue
        label = " ".join(key)
        memory.plot([p.pixels for p in ok], [max(p.peak_mem_bytes or 1, 1) / 2**20 for p in ok], "o-", label=label)
        seconds.plot([p.pixels for p in ok], [p.seconds for p in ok], "o-", label=label)
    for ax, ylabel in ((memory, "peak memory of the forward (MiB)"), (seconds, "seconds per image")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels (H x W)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    save_figure(plt, fig, path)
    return True


@dataclass
class Plan:
    """What one run measures."""

    device: torch.device
    models: list[str]
    resolutions: list[int]
    dtypes: list[str]
    implementations: list[str]


def plan(
    device: torch.device,
    *,
    resolutions: list[int],
    models: list[str] | None = None,
    dtypes: list[str] | None = None,
    implementations: list[str] | None = None,
) -> Plan:
    """What was asked, else this device's defaults: cvt-13; on a GPU transformers, cvt_fast eager and its kernels in
    float32 and bfloat16, on a CPU transformers, cvt_fast eager and ONNX Runtime (when installed) in float32."""
    on_gpu = device.type == "cuda"
    if implementations:
        names = list(dict.fromkeys(implementations))
    elif on_gpu:
        names = list(RESOLUTION_GPU_DEFAULT)
    else:
        names = [n for n in RESOLUTION_CPU_DEFAULT if n != "onnxruntime" or installed("onnxruntime")]
    unknown = [n for n in names if n not in IMPLEMENTATIONS]
    if unknown:
        raise Refused(
            f"argument --implementations: unknown {', '.join(map(repr, unknown))}; with --resolutions the "
            f"implementations are {', '.join(IMPLEMENTATIONS)}"
        )
    if "onnxruntime" in names and on_gpu:
        raise Refused("argument --implementations: onnxruntime runs on the CPU (--device cpu)")
    if "cvt_fast-triton" in names and not on_gpu:
        raise Refused(f"argument --implementations: cvt_fast-triton needs a CUDA device (--device is {device})")
    models = models or ["cvt-13"]
    check_models(models, resolutions, option="--resolutions")
    dtypes = dtypes or (["float32", "bfloat16"] if on_gpu else ["float32"])
    return Plan(device, list(models), list(resolutions), list(dtypes), names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one point of the resolution benchmark (used by it)")
    parser.add_argument("--worker", required=True, help="the point, as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(worker(json.loads(args.worker))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
