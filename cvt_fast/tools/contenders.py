"""The contenders the benchmarks know, by name, and which of them run when none are named. Imports nothing heavy,
so that the command line can list them in --help before torch is loaded."""

# cvt-fast bench: throughput (cvt_fast.tools.benchmark). Two groups: what a user runs without cvt_fast, and cvt_fast's
# own paths; each case's summary holds cvt_fast's fastest against the fastest without it.
WITHOUT_CVT_FAST = (
    "transformers-eager",  # float32, or autocast float16/bfloat16 over float32 weights, as transformers users run it
    "transformers-eager-cast",  # its weights cast to the dtype, no autocast: like for like with cvt_fast
    "transformers-compile",  # the first, under torch.compile
    "onnxruntime-transformers",  # ONNX Runtime (CPU) on transformers' own float32 ONNX export, as optimum makes it
    "openvino-transformers",  # OpenVINO (CPU) on transformers' model: float32, or bfloat16 where the CPU has it
)
WITH_CVT_FAST = (
    "cvt_fast-eager",  # backend="eager"
    "cvt_fast-eager-compile",  # the same under torch.compile(fullgraph=True)
    "cvt_fast-triton",  # backend="triton" (CUDA)
    "cvt_fast-triton-compile",  # the same under torch.compile(fullgraph=True)
    "cvt_fast-triton-cudagraph",  # cvt_fast-triton captured in a CUDA graph: one launch per forward
    "cvt_fast-frozen-inductor",  # cvt_fast.freeze(engine="inductor"): AOTInductor, for the case's shape and dtype (CPU)
    "cvt_fast-frozen-onnxruntime",  # cvt_fast.freeze(engine="onnxruntime"): cvt_fast's ONNX graph (CPU, float32)
    "cvt_fast-frozen-openvino",  # cvt_fast.freeze(engine="openvino"): cvt_fast's graph in OpenVINO (CPU)
)
THROUGHPUT = WITHOUT_CVT_FAST + WITH_CVT_FAST
# The frozen contenders, by the engine each runs on: freeze(engine="auto") keeps whichever of them is fastest.
FROZEN = {f"cvt_fast-frozen-{engine}": engine for engine in ("inductor", "onnxruntime", "openvino")}
THROUGHPUT_GPU_DEFAULT = (
    "transformers-eager",
    "transformers-eager-cast",
    "transformers-compile",
    "cvt_fast-eager",
    "cvt_fast-triton",
    "cvt_fast-triton-compile",
    "cvt_fast-triton-cudagraph",
)
# On the CPU: the baseline and the engines a user would otherwise serve with; cvt_fast's eager path and its graph
# frozen on each engine (compiled once per dtype, for every batch of the run; preparation times reported apart).
# transformers under torch.compile is left out (a compile per batch and dtype, minutes on 2 cores; ask for it by name).
THROUGHPUT_CPU_DEFAULT = (
    "transformers-eager",
    "onnxruntime-transformers",
    "openvino-transformers",
    "cvt_fast-eager",
    "cvt_fast-frozen-inductor",
    "cvt_fast-frozen-onnxruntime",
    "cvt_fast-frozen-openvino",
)
# Contenders that need a package beyond torch (and transformers), and the baseline every speed is divided by.
ENGINES = (
    "onnxruntime-transformers",
    "openvino-transformers",
    "cvt_fast-frozen-onnxruntime",
    "cvt_fast-frozen-openvino",
)
BASELINE = "transformers-eager"

# cvt-fast bench --resolutions: memory and time against image size (cvt_fast.tools.resolution).
RESOLUTION = ("transformers", "cvt_fast-eager", "cvt_fast-triton", "onnxruntime")
RESOLUTION_GPU_DEFAULT = ("transformers", "cvt_fast-eager", "cvt_fast-triton")
RESOLUTION_CPU_DEFAULT = ("transformers", "cvt_fast-eager", "onnxruntime")
