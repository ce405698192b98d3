"""The contenders the benchmarks know, by name, and which of them run when none are named. Imports nothing heavy,
so that the command line can list them in --help before torch is loaded."""

# cvt-fast bench: throughput (cvt_fast.tools.benchmark).
THROUGHPUT = (
    "transformers-eager",  # float32, or autocast float16/bfloat16 over float32 weights, as transformers users run it
    "transformers-eager-cast",  # its weights cast to the dtype, no autocast: like for like with cvt_fast
    "transformers-compile",  # the first, under torch.compile
    "cvt_fast-eager",  # backend="eager"
    "cvt_fast-eager-compile",  # the same under torch.compile(fullgraph=True): the CPU's compiled path
    "cvt_fast-triton",  # backend="triton" (CUDA)
    "cvt_fast-triton-compile",  # the same under torch.compile(fullgraph=True)
    "cvt_fast-triton-cudagraph",  # cvt_fast-triton captured in a CUDA graph: one launch per forward
    "cvt_fast-frozen",  # cvt_fast.freeze: compiled ahead of time for the case's shape and dtype (CPU)
    "onnxruntime",  # ONNX Runtime (CPU) on cvt_fast's float32 ONNX export
    "onnxruntime-transformers",  # ONNX Runtime (CPU) on transformers' own float32 ONNX export, as optimum makes it
    "openvino",  # OpenVINO (CPU) on transformers' model: float32, or bfloat16 where the CPU has it natively
)
THROUGHPUT_GPU_DEFAULT = (
    "transformers-eager",
    "transformers-eager-cast",
    "transformers-compile",
    "cvt_fast-eager",
    "cvt_fast-triton",
    "cvt_fast-triton-compile",
    "cvt_fast-triton-cudagraph",
)
# On the CPU: the baseline, cvt_fast's two paths, and the engines a user would otherwise serve with. The frozen path
# compiles once per case (its compile time is reported apart); torch.compile of the eager path is left out (the frozen
# path is the compiled one on the CPU; cvt_fast-eager-compile when asked for).
THROUGHPUT_CPU_DEFAULT = (
    "transformers-eager",
    "cvt_fast-eager",
    "cvt_fast-frozen",
    "onnxruntime",
    "onnxruntime-transformers",
    "openvino",
)
# Which contenders are engines (the field cvt_fast's CPU paths are held against) and which is the baseline.
ENGINES = ("onnxruntime", "onnxruntime-transformers", "openvino")
BASELINE = "transformers-eager"

# cvt-fast bench --resolutions: memory and time against image size (cvt_fast.tools.resolution).
RESOLUTION = ("transformers", "cvt_fast-eager", "cvt_fast-triton", "onnxruntime")
RESOLUTION_GPU_DEFAULT = ("transformers", "cvt_fast-eager", "cvt_fast-triton")
RESOLUTION_CPU_DEFAULT = ("transformers", "cvt_fast-eager", "onnxruntime")
