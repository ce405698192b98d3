"""What a frozen package was made from and for (FrozenInfo, stored in the package as JSON), and what freezing measured
of each engine it tried (Trial, known to the process that froze it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..config import CvtConfig
from ..cpu_target import CpuTarget

FORMAT = "cvt_fast.frozen/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Trial:
    """One engine as freeze tried it: built, checked against float64, timed on this CPU (or why not)."""

    engine: str
    status: str  # "chosen", "slower", "failed" (built but wrong, or the build failed), "skipped" (not tried)
    reason: str | None = None  # why failed or skipped
    build_s: float | None = None  # tracing, converting or compiling, and loading
    images_per_s: float | None = None  # median of interleaved rounds, at the package's batch size
    spread: float | None = None  # (slowest - fastest) / median of the rounds' means: the timing's own noise
    errors: dict[str, float] = field(default_factory=dict)  # each output's error against float64, relative
    settings: dict = field(default_factory=dict)  # how the engine was run (FrozenInfo.settings)

    @property
    def name(self) -> str:
        """The engine, and how it was run where it was tried more than one way."""
        if self.settings.get("streams", 1) > 1:
            return f"{self.engine} ({self.settings['streams']} streams)"
        return self.engine

    def describe(self) -> str:
        """One line, as the command line prints it."""
        if self.status == "skipped":
            return f"{self.name}: skipped ({self.reason})"
        if self.status == "failed":
            return f"{self.name}: failed ({self.reason})"
        errors = ", ".join(f"{name} {error:.1e}" for name, error in self.errors.items())
        speed = f"{self.images_per_s:.1f} images/s" if self.images_per_s is not None else "not timed"
        spread = f" ±{self.spread / 2:.0%}" if self.spread is not None else ""
        built = f", built in {self.build_s:.0f} s" if self.build_s is not None else ""
        return f"{self.name}: {speed}{spread}, error against float64 {errors}{built}" + (
            " <- chosen" if self.status == "chosen" else ""
        )


@dataclass
class FrozenInfo:
    """What a package was made from and for."""

    model_class: str  # "CvtForImageClassification" or "CvtModel"
    outputs: list[str]  # the output fields, in the order the engine returns them
    input_shape: tuple[int, int, int, int]  # (batch, channels, height, width)
    dtype: torch.dtype
    config: CvtConfig
    target: CpuTarget  # the CPU it was built and timed on
    torch_version: str
    cvt_fast_version: str
    engine: str = "inductor"  # "inductor" (AOTInductor), "onnxruntime" or "openvino"
    engine_version: str | None = None  # the engine's own version (torch's for inductor)
    threads: int | None = None  # the threads it was timed with
    settings: dict = field(default_factory=dict)  # how the engine runs it, as freezing measured best: {"streams": n}
    autotune: bool = False  # inductor: its GEMM templates timed against oneDNN's
    dynamic_batch: bool = False  # any batch up to input_shape[0] runs as it is (else smaller ones are padded)
    processor: dict | None = None  # the image processor's settings: whoever loads it preprocesses as the checkpoint
    processor_source: str | None = None  # "checkpoint", "given" (freeze's processor=) or "default" (CvT's own)
    # Known to the process that froze it (not stored in the package):
    compile_s: float | None = None  # the whole freeze, every engine tried
    validation: dict[str, float] = field(default_factory=dict)  # the kept engine's errors against float64
    trials: list[Trial] = field(default_factory=list)  # every engine considered, the kept one marked "chosen"

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "model_class": self.model_class, "outputs": self.outputs,
            "input_shape": list(self.input_shape), "dtype": dtype_name(self.dtype), "config": self.config.to_dict(),
            "target": self.target.as_dict(), "torch": self.torch_version, "cvt_fast": self.cvt_fast_version,
            "engine": self.engine, "engine_version": self.engine_version, "threads": self.threads,
            "settings": self.settings,
            "autotune": self.autotune, "dynamic_batch": self.dynamic_batch, "processor": self.processor,
            "processor_source": self.processor_source,
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> FrozenInfo:
        """Raises KeyError, TypeError or ValueError on a damaged record (the caller names the file)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError(f"the record is a JSON {type(data).__name__}, not an object")
        if data.get("format") != FORMAT:
            raise ValueError(f"package format {data.get('format')!r}; this cvt_fast reads {FORMAT!r}")
        return cls(
            model_class=data["model_class"],
            outputs=list(data["outputs"]),
            input_shape=tuple(data["input_shape"]),
            dtype=DTYPES[data["dtype"]],
            config=CvtConfig.from_dict(data["config"]),
            target=CpuTarget.from_dict(data["target"]),
            torch_version=data["torch"],
            cvt_fast_version=data["cvt_fast"],
            engine=data.get("engine", "inductor"),
            engine_version=data.get("engine_version") or data["torch"],
            threads=data.get("threads"),
            settings=dict(data.get("settings") or {}),
            autotune=bool(data.get("autotune", False)),
            dynamic_batch=bool(data.get("dynamic_batch", False)),
            processor=data.get("processor"),
            processor_source=data.get("processor_source"),
        )

    def describe_shape(self) -> str:
        batch, channels, height, width = self.input_shape
        batches = f"1 to {batch}" if self.dynamic_batch and batch > 1 else str(batch)
        return f"pixel_values ({batches}, {channels}, {height}, {width}) {dtype_name(self.dtype)}"
