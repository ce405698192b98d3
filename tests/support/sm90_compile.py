"""Compile cvt_fast's kernels for Hopper (sm_90) exactly as real launches specialise them, without a GPU.

The launchers themselves (flash_attention, qkv_conv_bn) are called on CPU tensors of the real shapes, with a
stand-in for Triton's CUDA driver that reports an sm_90 device, and with every JIT launch turned into Triton's
"warmup" (compile, do not launch). So Triton's own binder sees real argument values: pointers and strides get their
divisibility-by-16 attributes, arguments equal to 1 become constants, and the block sizes are the ones the
launcher's table (or the config it is given) picks. What comes out is the kernel a launch on an H100 would build.

Run as a script (TRITON_INTERPRET must be off in this process): reads a JSON list of launches on stdin, writes
{launch id: [one record per kernel compiled for it]} on stdout. A record holds the kernel's name, constants,
ptxas resource usage (REG, STACK, SHARED) and the count of each SASS opcode. Tools: Triton's bundled ptxas and
cuobjdump, so the result depends only on the installed Triton.

A launch is {"id", "op": "attention" | "qkv_conv_bn", "dtype": "float16" | "bfloat16" | "float32", ...}:
  attention:    batch, n_q, n_k, heads, head_dim, optional config [block_m, block_n, warps, stages]
  qkv_conv_bn:  batch, height, width, channels, ksize, stride_kv, padding_kv, with_cls, optional config
                [block_q, block_c, warps, blocks_per_program]
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

HOPPER = ("cuda", 90, 32)


class StandInDriver:
    """Just enough of Triton's CUDA driver for its JIT to compile for an sm_90 device: the target, a device index
    and a stream. Nothing is ever loaded or launched (see compile_instead_of_launch)."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(*HOPPER)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (9, 0)


def compile_instead_of_launch(compiled: list) -> None:
    """Every JIT launch compiles (Triton's warmup path, which runs the same binder) and records the kernel."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        kernel = kernel.result() if hasattr(kernel, "result") else kernel
        compiled.append(kernel)
        return kernel

    JITFunction.run = run


def tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def describe(kernel) -> dict:
    """Resource usage and SASS opcode counts of one compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True, text=True)
        sass = subprocess.run([tool("cuobjdump"), "-sass", cubin.name], capture_output=True, text=True, check=True)
    fields = next(line for line in usage.stdout.splitlines() if "REG:" in line).split()
    resources = {k: int(v) for k, v in (f.split(":") for f in fields if f.startswith(("REG:", "STACK:", "SHARED:")))}
    opcodes = collections.Counter()
    for line in sass.stdout.splitlines():
        # "        /*0a30*/              @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;"
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if match:
            opcodes[match.group(1)] += 1
    names = kernel.src.fn.arg_names
    constants = {
        names[path[0]]: value for path, value in kernel.src.constants.items() if isinstance(value, (int, float, str))
    }
    return {
        "name": kernel.name,
        "constants": constants,
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "shared": kernel.metadata.shared,
        **resources,
        "opcodes": dict(opcodes),
    }


def run_launch(spec: dict) -> None:
    import torch

    from cvt_fast.kernels.attention import AttentionConfig, flash_attention
    from cvt_fast.kernels.conv_projection import ConvConfig, qkv_conv_bn

    dtype = getattr(torch, spec["dtype"])
    if spec["op"] == "attention":
        channels = spec["heads"] * spec["head_dim"]
        q = torch.empty(spec["batch"], spec["n_q"], channels, dtype=dtype)
        k, v = (torch.empty(spec["batch"], spec["n_k"], channels, dtype=dtype) for _ in range(2))
        config = AttentionConfig(*spec["config"]) if spec.get("config") else None
        flash_attention(q, k, v, spec["heads"], channels**-0.5, config=config)
    else:
        channels, ksize = spec["channels"], spec["ksize"]
        x = torch.empty(spec["batch"], int(spec["with_cls"]) + spec["height"] * spec["width"], channels, dtype=dtype)
        weights = [torch.randn(channels, 1, ksize, ksize).to(dtype) for _ in range(3)]
        bn_params = [torch.rand(channels).to(dtype) + 0.5 for _ in range(12)]
        config = ConvConfig(*spec["config"]) if spec.get("config") else None
        qkv_conv_bn(
            x, spec["height"], spec["width"], spec["with_cls"], weights, bn_params, [1e-5] * 3,
            1, ksize // 2, spec["stride_kv"], spec["padding_kv"], config=config,
        )  # fmt: skip


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("sm90_compile.py compiles real kernels: run it without TRITON_INTERPRET")
    import triton
    from triton.runtime.driver import driver

    driver.set_active(StandInDriver())
    compiled: list = []
    compile_instead_of_launch(compiled)
    results = {"triton": triton.__version__, "launches": {}}
    described: dict[int, dict] = {}  # the JIT caches kernels: launches that share a specialisation share a record
    for spec in json.load(sys.stdin):
        compiled.clear()
        try:
            run_launch(spec)
            records = []
            for kernel in compiled:
                if id(kernel) not in described:
                    described[id(kernel)] = describe(kernel)
                records.append(described[id(kernel)])
            results["launches"][spec["id"]] = records
        except Exception as error:  # reported per launch, so one failure names itself
            results["launches"][spec["id"]] = {"error": f"{type(error).__name__}: {error}"[:3000]}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
