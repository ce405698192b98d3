"""AOTInductor: the eager path traced by torch.export (attention as scaled_dot_product_attention) and compiled with
inductor's freezing, which folds every BatchNorm into its convolution, prepacks the weights of the linear layers and
convolutions for oneDNN (AMX or AVX-512 where the CPU has them) and fuses LayerNorm, GELU and the residual adds into
C++ loops. The artifact is a torch .pt2 archive of native code for this CPU class and this torch, whose AOTInductor
metadata also holds the package's record (so a bare .pt2 is a package of its own)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import weakref
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ...cpu_target import CpuTarget
from ...cpu_target import cannot_run as cpu_cannot_run
from ...errors import CheckpointError, one_line
from ..graph import quiet
from ..record import FrozenInfo

NAME = "inductor"
INSTALL = "part of torch"
ARTIFACT = "model.pt2"
FILES = (ARTIFACT,)  # what a package holds of it
METADATA_KEY = "cvt_fast.frozen"  # the record, in the package's AOTInductor metadata


def version() -> str:
    return torch.__version__


def missing() -> str | None:
    return None


def refuses(dtype: torch.dtype, here: CpuTarget) -> str | None:
    return None  # float32 and bfloat16 (emulated, and slow, without native bfloat16: the caller chose it)


def cannot_run(info: FrozenInfo, here: CpuTarget) -> str | None:
    """Native code: it needs the instructions it was compiled for."""
    return cpu_cannot_run(info.target, here)


def build(graphs, info: FrozenInfo, folder: Path) -> dict[str, Path]:
    """Compile graphs.program() (the eager path in the frozen dtype) into folder/model.pt2."""
    configs = {"freezing": True, "aot_inductor.metadata": {METADATA_KEY: info.to_json()}}
    if info.autotune:
        configs.update({"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"})
    program = graphs.program()
    with torch.no_grad(), quiet(), _inductor_cache_for(info.target):  # freezing folds constants without grad
        torch._inductor.aoti_compile_and_package(program, package_path=str(folder / ARTIFACT), inductor_configs=configs)
    return {ARTIFACT: folder / ARTIFACT}


def load(files: dict[str, Path], info: FrozenInfo):
    return _Runner(files[ARTIFACT])


def record_in(archive: zipfile.ZipFile) -> str | None:
    """The cvt_fast record in a .pt2 archive's AOTInductor metadata, or None (another AOTInductor package)."""
    import json

    for name in archive.namelist():
        if name.endswith("_metadata.json") and "/aotinductor/" in name:
            metadata = json.loads(archive.read(name))
            if isinstance(metadata, dict) and METADATA_KEY in metadata:
                return metadata[METADATA_KEY]
    return None


@contextlib.contextmanager
def _inductor_cache_for(target: CpuTarget) -> Iterator[None]:
    """Inductor's on-disk cache (torch 2.13) is not keyed by the vector ISA: code compiled for AVX-512 is served to a
    process capped at AVX2 (NaNs, or a crash). Unless the user chose a cache folder, compile into one per target."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        yield
        return
    tag = re.sub(r"[^A-Za-z0-9]+", "_", f"{target.capability}_{'bf16' if target.onednn_native_bfloat16 else 'nobf16'}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_cvt_fast_{tag.lower()}"
    try:
        yield
    finally:
        if chosen is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = chosen


class _Runner:
    """The package's compiled code, ready to run: pixel_values -> list of output tensors.

    AOTInductor keeps a package's weights in one block of memory copied from the shared library, and oneDNN's matrix
    products read their prepacked weights from there markedly slower than from weights allocated one by one: measured
    on an AMX Xeon, cvt-13 in bfloat16 at batch 8 ran 1.28x faster, and 1.05x to 1.08x in the other cases, once each
    weight was copied into its own allocation (bench/results/NOTES.md). So every weight is copied out once, at load,
    and handed back to the runner, which then reads the copies (kept alive here) and frees its block."""

    def __init__(self, package: Path):
        self._folder = Path(tempfile.mkdtemp(prefix="cvt_fast_package_"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
        with zipfile.ZipFile(package) as archive:
            libraries = [n for n in archive.namelist() if "/aotinductor/" in n and n.endswith(".so")]
            if len(libraries) != 1:
                raise CheckpointError(f"{package}: expected one compiled library in the package, found "
                                      f"{len(libraries)}")  # fmt: skip
            archive.extractall(self._folder)
        with quiet():
            self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(self._folder / libraries[0]), 1)
        self._weights = self._own_weights()

    def _own_weights(self) -> dict[str, torch.Tensor] | None:
        """Every weight copied into an allocation of its own and given to the runner (see the class); None, and the
        runner's own block kept, where this torch's runner cannot take them."""
        runner = self._runner
        try:
            names = {fqn: name for name, fqn in runner.get_constant_names_to_original_fqns().items()}
            weights = {names[fqn]: tensor.clone() for fqn, tensor in runner.extract_constants_map(False).items()}
            runner.update_constant_buffer(weights, True, True, True)  # into the spare buffer, user-managed
            runner.swap_constant_buffer()
            runner.free_inactive_constant_buffer()
        except (AttributeError, KeyError, RuntimeError, TypeError) as error:
            from ...ops.dispatch import log_once

            log_once(f"frozen packages read their weights where AOTInductor put them (slower): {one_line(error)}")
            return None
        return weights

    def __call__(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self._runner.run([pixel_values])
