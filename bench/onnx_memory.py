"""Peak memory and time of one ONNX Runtime forward of an exported CvT, each size in a fresh process.

  python bench/onnx_memory.py cvt.onnx 512 768 1024

Memory: the forward's peak resident memory (VmHWM, reset just before it) over what the process held before, as
`cvt-fast bench --resolutions` measures the CPU points. Compares the two attention forms of `cvt-fast export`
(`--attention ort` writes ONNX Runtime's fused MultiHeadAttention, `--attention onnx` the standard Attention op).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def _kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def point(path: str, size: int) -> dict:
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(size).standard_normal((1, 3, size, size), dtype=np.float32)
    session.run(None, {"pixel_values": x[:, :, :64, :64].copy()})  # first-call setup outside the measurement
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    session.run(None, {"pixel_values": x})
    return {"size": size, "seconds": time.perf_counter() - start, "peak_gib": (_kib("VmHWM") - before) / 2**20}


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--point":
        print(json.dumps(point(argv[1], int(argv[2]))))
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    path, sizes = argv[0], [int(s) for s in argv[1:]]
    for size in sizes:
        result = subprocess.run([sys.executable, __file__, "--point", path, str(size)], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{path} {size}px: failed: {result.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(result.stdout)
        print(f"{path} {size}px: {r['seconds']:.2f} s, +{r['peak_gib']:.2f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
