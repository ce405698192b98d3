"""The stages of the GPU session that are not a test run or the kernel sweep (see bench/gpu_session.sh):

  python bench/gpu_session.py env     --out DIR [--rehearse]   device, versions, measured ceilings -> env.json
  python bench/gpu_session.py parity  --out DIR [--rehearse]   the whole model under backend "triton" against
                                                               transformers, float32 and bfloat16 -> parity.json
  python bench/gpu_session.py models  --out DIR [--rehearse]   cvt-13 at 224, bfloat16, batch 256 and 1, every
                                                               contender of `cvt-fast bench` -> models.jsonl
  python bench/gpu_session.py resolution --out DIR [--rehearse]  memory and time against image size, 224 to
                                                               2048 px, float32 and bfloat16 -> resolution.jsonl
  python bench/gpu_session.py summary --out DIR                a short table of everything, against the targets

--rehearse runs each stage on the CPU at tiny sizes (kernels in Triton's interpreter, float32 where bfloat16 is
impossible there), so that a GPU call never dies of a Python error the CPU could have shown.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

# Targets the GPU-evidence issue sets; the summary holds every figure against them.
TARGETS = {
    "conv_speedup_vs_eager": 3.0,
    "conv_fraction_of_copy_bandwidth": 0.8,
    "attention_speedup_vs_einsum": 5.0,
    "attention_vs_best_sdpa": 1.0,
    "model_vs_transformers_compile": 2.0,
    "model_vs_transformers_autocast": 4.0,
    "batch1_latency_vs_transformers": 3.0,
    "peak_memory_vs_transformers": 0.5,
}


def write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---- env ----------------------------------------------------------------------------------------------------


def stage_env(out: Path, rehearse: bool) -> None:
    import numpy

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__}  # fmt: skip
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if rehearse or not torch.cuda.is_available():
        env["device"] = f"cpu ({platform.processor() or platform.machine()}): rehearsal, no ceilings measured"
    else:
        import triton.testing

        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sm_count=props.multi_processor_count, memory_bytes=props.total_memory)
        env.update(l2_bytes=getattr(props, "L2_cache_size", None), capability=f"{props.major}.{props.minor}")
        try:
            env["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:
            env["driver"] = None
        src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
        env["copy_bandwidth_bytes_per_s"] = 2 * src.numel() / (ms * 1e-3)  # bytes read + written
        del src, dst
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = triton.testing.do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
        env["bf16_matmul_flops_per_s"] = 2 * 8192**3 / (ms * 1e-3)
    write_json(out / "env.json", env)
    print(json.dumps(env), flush=True)


# ---- parity -------------------------------------------------------------------------------------------------


def session_config(rehearse: bool):
    """CvT-13; in the rehearsal with fewer layers (the interpreter runs one program at a time), as many as
    transformers needs (its stage s takes the s-th stochastic-depth rate of its layers)."""
    import cvt_fast

    config = cvt_fast.preset("cvt-13").config()
    if rehearse:
        fields = {k: v for k, v in config.to_dict().items() if k != "model_type"}
        config = cvt_fast.CvtConfig(**{**fields, "depth": [1, 2, 3]})
    return config


def stage_parity(out: Path, rehearse: bool) -> None:
    """cvt_fast (backend "triton", and "eager" for scale) against transformers' float32 model on the same device:
    logits and every stage's hidden state, held to the kernels' accuracy rule: the kernels' error at most twice the
    eager path's in the same dtype plus a floor (2e-5 float32, 1e-2 bfloat16)."""
    import cvt_fast
    from cvt_fast.testing import float32_without_tf32
    from cvt_fast.testing import relative_error as rel_err
    from cvt_fast.tools.models import random_model, transformers_twin

    float32_without_tf32()  # transformers' float32 reference in float32, not in cuDNN's default TF32
    device = "cpu" if rehearse else "cuda"
    config = session_config(rehearse)
    size, batch = (32, 1) if rehearse else (224, 8)
    generator = torch.Generator().manual_seed(0)
    base = random_model(config, generator)
    reference_model = transformers_twin(base).eval().to(device)
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device)
    with torch.inference_mode():
        reference = reference_model(pixels, output_hidden_states=True)
    results = []
    # The interpreter has no bfloat16, and PyTorch's float16 convolutions on the CPU take seconds: the rehearsal
    # checks the path in float32.
    dtypes = (torch.float32,) if rehearse else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        errors = {}
        for backend in ("eager", "triton"):
            model = cvt_fast.CvtForImageClassification(config, backend=backend).eval()
            model.load_state_dict(base.state_dict())
            model = model.to(device, dtype)
            with torch.inference_mode():
                output = model(pixels.to(dtype), output_hidden_states=True)
            paths = {p for layer in model.kernel_paths().values() for p in layer.values()}
            record = dict(dtype=str(dtype).removeprefix("torch."), backend=backend, image_size=size, batch=batch,
                          logits_rel_err=rel_err(output.logits, reference.logits),
                          hidden_rel_err=[rel_err(a, e) for a, e in zip(output.hidden_states, reference.hidden_states,
                                                                         strict=True)],
                          paths=sorted(paths), finite=bool(torch.isfinite(output.logits).all()))  # fmt: skip
            errors[backend] = record["logits_rel_err"]
            results.append(record)
            print(json.dumps(record), flush=True)
        floor = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
        results[-1]["within_rule"] = errors["triton"] <= 2 * errors["eager"] + floor
        results[-1]["all_layers_on_kernels"] = results[-1]["paths"] == ["triton"]
    write_json(out / "parity.json", results)


# ---- models -------------------------------------------------------------------------------------------------


def stage_models(out: Path, rehearse: bool, budget_s: float) -> None:
    """cvt-13 at 224 px in bfloat16, batch 256 then 1, every contender of `cvt-fast bench`; each record appended
    to models.jsonl as soon as its case finishes."""
    from dataclasses import asdict

    from cvt_fast.tools.benchmark import bench_case
    from cvt_fast.tools.contenders import THROUGHPUT_GPU_DEFAULT as GPU_DEFAULT

    deadline = time.monotonic() + budget_s
    with tempfile.TemporaryDirectory() as folder:
        if rehearse:  # inductor on the CPU takes minutes and CUDA graphs need CUDA: the rest is rehearsed
            session_config(rehearse).save_pretrained(folder)
            cases = [(folder, 32, 2, "float32")]
            implementations = ["transformers-eager", "cvt_fast-eager", "cvt_fast-triton"]
            device = torch.device("cpu")
        else:
            cases = [("cvt-13", 224, 256, "bfloat16"), ("cvt-13", 224, 1, "bfloat16")]
            implementations = list(GPU_DEFAULT)
            device = torch.device("cuda")
        path = out / "models.jsonl"
        path.write_text("")
        for index, (model, size, batch, dtype) in enumerate(cases):
            if time.monotonic() > deadline:
                print(f"time budget reached: {len(cases) - index} model cases not run", flush=True)
                break

            def on_record(r, size=size, batch=batch, dtype=dtype):  # appended the moment it is final
                append_jsonl(path, asdict(r))
                speed = f"{r.images_per_s:.1f} images/s" if r.images_per_s else f"error: {r.error}"
                compile_s = f"  compile {r.compile_s:.1f} s" if r.compile_s is not None else ""
                print(f"{size}px batch {batch} {dtype} {r.implementation:<26} {speed}  max err {r.max_err}{compile_s}",
                      flush=True)  # fmt: skip

            bench_case(model, size, batch, dtype, implementations, device, 1, lambda m: print(m, flush=True), on_record)


# ---- training step ------------------------------------------------------------------------------------------


def stage_train(out: Path, rehearse: bool) -> None:
    """A fine-tuning step of cvt-13 at 224 px (bf16 autocast, batch 64) against transformers': speed, peak memory,
    what autograd keeps, gradients against float64. Appended to models.jsonl ("kind": "train"): the session's files
    stay within what the device tool brings back."""
    from dataclasses import asdict

    from cvt_fast.tools.training_benchmark import train_case

    with tempfile.TemporaryDirectory() as folder:
        if rehearse:
            session_config(rehearse).save_pretrained(folder)
            case, device = (folder, 32, 2, "float32"), torch.device("cpu")
        else:
            case, device = ("cvt-13", 224, 64, "bfloat16"), torch.device("cuda")
        for r in train_case(*case, device, rounds=2, progress=lambda m: print(m, flush=True)):
            append_jsonl(out / "models.jsonl", {"kind": "train", **asdict(r)})
            print(f"train step {r.implementation:<13} {r.images_per_s:.1f} images/s, peak {r.peak_mem_bytes}, kept "
                  f"for backward {r.saved_bytes}, grad err {r.grad_err:.1e} against float64", flush=True)  # fmt: skip


# ---- resolution ---------------------------------------------------------------------------------------------


def stage_resolution(out: Path, rehearse: bool) -> None:
    """cvt_fast.tools.resolution: transformers, cvt_fast eager and triton, float32 and bfloat16, 224 to 2048 px."""
    from cvt_fast.tools import resolution

    with tempfile.TemporaryDirectory() as folder:
        if rehearse:  # CPU points in fresh processes, as `cvt-fast bench --resolutions` runs them there
            session_config(rehearse).save_pretrained(folder)
            models, sizes, dtypes = [folder], [32, 48], ["float32"]
            implementations, device = ["transformers", "cvt_fast-eager"], torch.device("cpu")
        else:
            models, sizes, dtypes = ["cvt-13"], [224, 512, 1024, 2048], ["float32", "bfloat16"]
            implementations, device = list(resolution.IMPLEMENTATIONS), torch.device("cuda")
        resolution.run(models, sizes, dtypes, implementations, device, resolution.default_cap_bytes(),
                       jsonl=out / "resolution.jsonl", progress=lambda m: print(m, flush=True))  # fmt: skip


# ---- summary ------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "-"
    met = value >= target if higher_is_better else value <= target
    return f"{value:.2f} ({'meets' if met else 'misses'} {target})"


def ms(record: dict | None) -> str:
    return f"{record['ms']:.3f}" if record and record.get("ms") is not None else "-"


def config_name(record: dict | None) -> str:
    return "x".join(map(str, record["config"])) if record and record.get("config") else "-"


def fastest(records: list[dict], prefix: str) -> dict | None:
    timed = [r for r in records if r["implementation"].startswith(prefix) and r.get("ms") is not None]
    return min(timed, key=lambda r: r["ms"], default=None)


def summarize_kernels(records: list[dict]) -> list[str]:
    """Per case: the baseline transformers runs, the kernel with its table's config, the fastest candidate, the
    fastest SDPA backend; the table's speed-up and share of the ceiling, held against the targets."""
    lines = ["| op | shape | dtype | batch | baseline ms | table ms (config) | best ms (config) | vs baseline | "
             "vs best SDPA | of ceiling | err |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cases: dict[tuple, list[dict]] = {}
    for r in records:
        cases.setdefault((r["op"], r["model"], r["image_size"], r["stage"], r["dtype"], r["batch"]), []).append(r)
    for (op, model, size, stage, dtype, batch), rs in cases.items():
        by_name = {r["implementation"]: r for r in rs}
        table = by_name.get("cvt_fast kernel (table)")
        if table is None:
            continue
        best, sdpa = fastest(rs, "cvt_fast"), fastest(rs, "sdpa")
        baseline = by_name.get("eager sequence" if op == "qkv_projection" else "einsum (transformers)")
        speedup = vs_sdpa = None
        if table.get("ms") is not None:
            speedup = baseline["ms"] / table["ms"] if baseline and baseline.get("ms") is not None else None
            vs_sdpa = sdpa["ms"] / table["ms"] if sdpa else None
        target = TARGETS["conv_speedup_vs_eager" if op == "qkv_projection" else "attention_speedup_vs_einsum"]
        ceiling = table.get("fraction_of_copy_bandwidth", table.get("fraction_of_matmul_rate"))
        cells = [op, f"{model} {size} s{stage}", dtype, batch, ms(baseline), f"{ms(table)} ({config_name(table)})",
                 f"{ms(best)} ({config_name(best)})", verdict(speedup, target),
                 verdict(vs_sdpa, TARGETS["attention_vs_best_sdpa"]) if op == "attention" else "-",
                 f"{ceiling:.0%}" if ceiling else "-",
                 f"{table['max_rel_err']:.1e}" if "max_rel_err" in table else table.get("error", "-")]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    errors = [r for r in records if r.get("error") and r["implementation"].startswith("cvt_fast")]
    lines += [f"kernel error: {r['op']} {r['model']} s{r['stage']} {r['dtype']} b{r['batch']} "
              f"{r['implementation']}: {r['error']}" for r in errors]  # fmt: skip
    return lines


def summarize_training(records: list[dict]) -> list[str]:
    lines = ["| batch | dtype | implementation | images/s | peak MiB | kept for backward MiB | grad err vs float64 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "-"
        cells = [r["batch"], r["dtype"], r["implementation"], f"{r['images_per_s']:.1f}", mem,
                 f"{r['saved_bytes'] / 2**20:.0f}", f"{r['grad_err']:.1e}"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def summarize_models(records: list[dict]) -> list[str]:
    lines = ["| batch | implementation | images/s | vs transformers-eager | vs transformers-compile | peak MiB | "
             "max err | compile s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by_batch: dict[int, dict[str, dict]] = {}
    for r in records:
        by_batch.setdefault(r["batch"], {})[r["implementation"]] = r
    for batch, rs in by_batch.items():
        eager, compiled = rs.get("transformers-eager", {}), rs.get("transformers-compile", {})
        for name, r in rs.items():
            speed = r.get("images_per_s")
            vs_eager = speed / eager["images_per_s"] if speed and eager.get("images_per_s") else None
            vs_compile = speed / compiled["images_per_s"] if speed and compiled.get("images_per_s") else None
            mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "-"
            shown = f"{speed:.1f}" if speed else f"error: {r.get('error')}"
            err = f"{r['max_err']:.1e}" if r.get("max_err") is not None else "-"
            compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
            cells = [batch, name, shown, f"{vs_eager:.2f}x" if vs_eager else "-",
                     f"{vs_compile:.2f}x" if vs_compile else "-", mem, err, compile_s]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        best = max((r for n, r in rs.items() if n.startswith("cvt_fast") and r.get("images_per_s")),
                   key=lambda r: r["images_per_s"], default=None)  # fmt: skip
        if best and batch >= 64:
            if compiled.get("images_per_s"):
                lines.append(
                    f"batch {batch}, {best['implementation']} vs transformers-compile: "
                    + verdict(best["images_per_s"] / compiled["images_per_s"], TARGETS["model_vs_transformers_compile"])
                )
            if eager.get("images_per_s"):
                lines.append(
                    f"batch {batch}, {best['implementation']} vs transformers-eager (autocast): "
                    + verdict(best["images_per_s"] / eager["images_per_s"], TARGETS["model_vs_transformers_autocast"])
                )
            if eager.get("peak_mem_bytes") and best.get("peak_mem_bytes"):
                lines.append(
                    f"batch {batch}, peak memory vs transformers-eager: "
                    + verdict(
                        best["peak_mem_bytes"] / eager["peak_mem_bytes"], TARGETS["peak_memory_vs_transformers"], False
                    )
                )
        if best and batch == 1 and eager.get("images_per_s"):
            lines.append(
                f"batch 1, {best['implementation']} latency vs transformers-eager: "
                + verdict(best["images_per_s"] / eager["images_per_s"], TARGETS["batch1_latency_vs_transformers"])
            )
    return lines


def summarize_resolution(records: list[dict]) -> list[str]:
    lines = ["| implementation | dtype | " + " | ".join(f"{r} px" for r in sorted({p["resolution"] for p in records}))
             + " |"]  # fmt: skip
    sizes = sorted({p["resolution"] for p in records})
    lines.append("|---|---|" + "---|" * len(sizes))
    for key in dict.fromkeys((p["implementation"], p["dtype"]) for p in records):
        cells = []
        for size in sizes:
            p = next((p for p in records if (p["implementation"], p["dtype"], p["resolution"]) == (*key, size)), None)
            if p is None:
                cells.append("-")
            elif p["status"] == "ok":
                mem = p["peak_mem_bytes"] / 2**30 if p["peak_mem_bytes"] is not None else float("nan")
                cells.append(f"{p['seconds'] * 1e3:.0f} ms, {mem:.2f} GiB")
            else:
                cells.append(p["status"].split(":")[0])
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return lines


def stage_summary(out: Path) -> None:
    lines = ["# GPU session summary", ""]
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    ceilings = ""
    if env.get("copy_bandwidth_bytes_per_s"):
        ceilings = (f", copy {env['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
                    f"bf16 matmul {env['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")  # fmt: skip
    lines.append(f"{env.get('device', '?')}; torch {env.get('torch')}, triton {env.get('triton')}, transformers "
                 f"{env.get('transformers')}, numpy {env.get('numpy')}{ceilings}")  # fmt: skip
    tests = (out / "tests.log").read_text() if (out / "tests.log").exists() else ""
    counts = re.findall(r"^=*\s*(\d+ \w+.*?) in [\d.]+s", tests, re.MULTILINE)
    lines += ["", "## gpu tests: " + (counts[-1] if counts else "no result (see tests.log)")]
    lines += [line for line in tests.splitlines() if line.startswith(("FAILED", "ERROR"))][:20]
    parity = json.loads((out / "parity.json").read_text()) if (out / "parity.json").exists() else []
    lines += ["", "## whole model against transformers (float32 reference)", "| dtype | backend | logits err | "
              "hidden err (per stage) | paths | rule |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in parity:
        hidden = ", ".join(f"{e:.1e}" for e in r["hidden_rel_err"])
        rule = {True: "within", False: "OUTSIDE"}.get(r.get("within_rule"), "")
        lines.append(f"| {r['dtype']} | {r['backend']} | {r['logits_rel_err']:.1e} | {hidden} | "
                     f"{','.join(r['paths'])} | {rule} |")  # fmt: skip
    lines += ["", "## kernels (table config against baselines and the best candidate)"]
    lines += summarize_kernels(read_jsonl(out / "kernels.jsonl"))
    records = read_jsonl(out / "models.jsonl")
    lines += ["", "## models (cvt-13, 224 px)"] + summarize_models([r for r in records if r.get("kind") != "train"])
    lines += ["", "## a fine-tuning step against transformers'"] + summarize_training(
        [r for r in records if r.get("kind") == "train"]
    )
    lines += ["", "## memory and time against image size (batch 1)"] + summarize_resolution(
        read_jsonl(out / "resolution.jsonl")
    )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["env", "parity", "models", "train", "resolution", "summary"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "env":
        stage_env(args.out, args.rehearse)
    elif args.stage == "parity":
        stage_parity(args.out, args.rehearse)
    elif args.stage == "models":
        stage_models(args.out, args.rehearse, args.budget_s)
    elif args.stage == "train":
        stage_train(args.out, args.rehearse)
    elif args.stage == "resolution":
        stage_resolution(args.out, args.rehearse)
    else:
        stage_summary(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
