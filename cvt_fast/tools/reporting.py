"""What the benchmarks share: the dtypes they take, the models they accept, the machine each figure names, progress
lines, markdown tables and plots, and the one way results are written."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import PRESETS, CvtConfig, preset_named
from ..errors import Refused

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except Exception:
            return None

    return {"torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_description()


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own notices while the benchmarks build and convert its model (a deprecated attribute read by the
    converters, the default loss it picks for a config without one) say nothing about the figures: hidden."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        yield
        return
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


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


def cpu_native_bfloat16() -> str | None:
    """The CPU's native bfloat16 instructions (AMX, AVX-512 BF16), or None where bfloat16 would be emulated (or
    where oneDNN, capped by ONEDNN_MAX_CPU_ISA, will not use them)."""
    from ..ops.cpu_linear import cpu_has_native_bfloat16

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    found = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
    return (" and ".join(found) or None) if cpu_has_native_bfloat16() else None


def check_models(models: Sequence[str], sizes: Sequence[int], option: str = "--sizes") -> None:
    """Every model names a preset or a config file, and every image size suits every model."""
    from ..checks import check_image_size

    for name in models:
        if (preset := preset_named(name)) is not None:
            config = preset.config()
        elif Path(name).exists():
            config = CvtConfig.from_pretrained(name)  # its refusals name the file
        else:
            raise Refused(
                f"argument --models: unknown preset {name!r}; the presets are {', '.join(PRESETS)} "
                "(or give the path of a config.json)"
            )
        for size in sizes:
            try:
                check_image_size(config, size, size)
            except ValueError as error:
                raise Refused(f"argument {option}: {size} does not suit {name}: {error}") from None


def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A field of /proc/<pid>/status in KiB (VmRSS, VmHWM), or None where there is no such file."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_bytes(fn: Callable[[], object]) -> tuple[object, int | None]:
    """(fn(), the peak resident memory it took over what the process held before), on Linux; None elsewhere. The
    kernel's high-water mark is reset to the present first (/proc/self/clear_refs), so the peak is fn's own."""
    before = status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    result = fn()
    peak = status_kib("VmHWM")
    return result, None if peak is None or before is None else max(0, peak - before) * 1024


def progress_printer(total: int, stream=None) -> Callable[[str], None]:
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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None without matplotlib (the plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_records(
    out_dir: Path, stem: str, records: Sequence[object], markdown: str, plot: Callable[[Path], bool] | None = None
) -> list[Path]:
    """`stem`.json (the records, dataclasses, in full), `stem`.md (`markdown`) and, where `plot` draws one (it needs
    matplotlib), `stem`.png, in out_dir; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    written[0].write_text(json.dumps([dataclasses.asdict(r) for r in records], indent=1) + "\n")
    written[1].write_text(markdown)
    if plot is not None and plot(out_dir / f"{stem}.png"):
        written.append(out_dir / f"{stem}.png")
    return written
