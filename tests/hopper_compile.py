"""Compile cvt_fast's kernels for Hopper (sm_90) without a GPU and report ptxas' resource usage.

Run as a script (the kernels must be real JIT functions, so TRITON_INTERPRET must be off in this process):
reads a JSON list of jobs on stdin, writes {job id: {"REG": n, "STACK": bytes} or {"error": message}} on stdout.
A job is {"id", "kernel": "attention" | "qkv_conv_bn", "dtype": "fp16" | "bf16" | "fp32", "constants", "options"}.
"""

import json
import os
import subprocess
import sys
import tempfile

HOPPER = ("cuda", 90, 32)


def signature(kernel: str, dtype: str) -> dict:
    if kernel == "attention":
        sig = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
        ints = ("stride_qb", "stride_qn", "stride_kb", "stride_kn", "stride_vb", "stride_vn", "Nq", "Nk", "num_heads")
        sig.update({name: "i32" for name in (*ints, "tune_programs")})
        sig["qk_scale"] = "fp32"
        constexprs = ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "DOT_PRECISION")
    else:
        sig = {name: f"*{dtype}" for name in ("x_ptr", "q_ptr", "k_ptr", "v_ptr", "wq_ptr", "wk_ptr", "wv_ptr")}
        sig.update({f"{b}_{p}": f"*{dtype}" for b in "qkv" for p in ("gamma", "beta", "mean", "var")})
        sig.update({name: "fp32" for name in ("q_eps", "k_eps", "v_eps")})
        sig.update({name: "i32" for name in ("stride_xb", "stride_xt", "C", "H", "W", "Hq", "Wq", "Hk", "Wk")})
        constexprs = ("KSIZE", "STRIDE_Q", "PAD_Q", "STRIDE_KV", "PAD_KV", "WITH_CLS", "BLOCK_Q", "BLOCK_KV", "BLOCK_C")
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cvt_fast.kernels import attention, conv_projection

    functions = {"attention": attention._attention_kernel, "qkv_conv_bn": conv_projection._qkv_conv_bn_kernel}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = {}
    for job in json.load(sys.stdin):
        try:
            source = ASTSource(functions[job["kernel"]], signature(job["kernel"], job["dtype"]), job["constants"])
            compiled = triton.compile(source, target=GPUTarget(*HOPPER), options=job["options"])
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
            fields = next(line for line in usage.stdout.splitlines() if "REG:" in line).split()
            results[job["id"]] = {
                k: int(v) for k, v in (f.split(":") for f in fields if f.startswith(("REG:", "STACK:")))
            }
        except Exception as error:  # reported per job, so one failure names itself
            results[job["id"]] = {"error": f"{type(error).__name__}: {error}"[:2000]}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
