"""What the launchers decide around the kernels: the device they launch on, autotuning versus CUDA graph capture,
how float32 attention runs, and the tables' choices on CvT shapes."""

import pytest
import torch

from cvt_fast import ops
from cvt_fast.ops.dispatch import FP32_ATTENTION_VAR

pytest.importorskip("triton")
from cvt_fast.kernels import attention, conv_projection, launch  # noqa: E402

pytestmark = pytest.mark.kernel


def test_autotuning_is_refused_inside_graph_capture_until_the_shape_is_tuned(monkeypatch):
    monkeypatch.setattr(attention, "_tuned_keys", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    key = (3136, 784, 64, 256, torch.bfloat16)
    with pytest.raises(RuntimeError, match="has not been tuned for this shape yet.*run one forward pass"):
        attention._check_tuned_before_capture(key)
    capturing[0] = False
    attention._check_tuned_before_capture(key)  # the first call outside capture tunes
    capturing[0] = True
    attention._check_tuned_before_capture(key)  # and capture may follow


@pytest.mark.parametrize(
    "dtype, tuner", [(torch.float32, "float32"), (torch.bfloat16, "half"), (torch.float16, "half")]
)
def test_autotuning_tries_only_the_dtypes_candidates(monkeypatch, dtype, tuner):
    """float32 runs three TF32 products per dot and spills registers on the half-precision tiles: it is tuned over
    its own candidates."""
    tried = {
        name: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in autotuner.configs]
        for name, autotuner in attention._autotuned.items()
    }
    assert tried["float32"] == [tuple(c) for c in attention.candidate_configs(torch.float32)]
    assert tried["half"] == [tuple(c) for c in attention.candidate_configs(torch.bfloat16)]

    calls = []

    class StandIn:  # records which autotuner the launcher picks; launches nothing
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(self.name)

    monkeypatch.setenv("CVT_FAST_AUTOTUNE", "1")
    monkeypatch.setattr(attention, "TRITON_INTERPRET", False)
    monkeypatch.setattr(attention, "_autotuned", {name: StandIn(name) for name in attention._autotuned})
    q, k = torch.zeros(1, 64, 64, dtype=dtype), torch.zeros(1, 16, 64, dtype=dtype)
    attention.flash_attention(q, k, k, num_heads=1, scale=0.125)
    assert calls == [tuner]


def test_cpu_tensors_launch_without_switching_devices():
    assert type(launch.launch_guard(torch.empty(1))).__name__ == "nullcontext"
    # a CPU tensor stands for Hopper (the sm_90 compile check): 132 multiprocessors on H100 SXM and H200
    assert launch.multiprocessor_count(torch.device("cpu")) == 132


def test_the_guard_switches_to_the_tensors_device_only_when_it_is_not_current(monkeypatch):
    """Triton launches on the current device: a tensor on cuda:1 while cuda:0 is current needs a switch (entering it
    needs a GPU; choosing it does not)."""

    class OnCuda1:  # what launch_guard reads of a tensor
        is_cuda = True
        device = torch.device("cuda", 1)

    current = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    guard = launch.launch_guard(OnCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    current[0] = 1
    assert type(launch.launch_guard(OnCuda1())).__name__ == "nullcontext"


@pytest.mark.gpu
def test_kernels_run_on_their_tensors_device_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 128, generator=generator) for n in (50, 13, 13))
    expected = ops.attention_reference(q.double(), k.double(), v.double(), 2, 128**-0.5)
    with torch.cuda.device(0):
        out = attention.flash_attention(*(t.to("cuda:1") for t in (q, k, v)), 2, 128**-0.5)
    assert out.device == torch.device("cuda:1")
    assert (out.double().cpu() - expected).abs().max() < 1e-4


def run_attention(head_dim, device):
    q, k, v = (torch.randn(1, n, head_dim, device=device) for n in (9, 4, 4))
    route = ops.attention_route("triton", head_dim, 1)  # reads CVT_FAST_FP32_ATTENTION
    with torch.no_grad():
        ops.attention(q, k, v, 1, head_dim**-0.5, route)
    return route.taken


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU, backend="triton" runs the interpreter


def test_float32_attention_runs_the_kernel_unless_given_to_sdpa(monkeypatch):
    monkeypatch.delenv(FP32_ATTENTION_VAR, raising=False)
    assert run_attention(64, DEVICE) == "triton"
    monkeypatch.setenv(FP32_ATTENTION_VAR, "SDPA")
    assert (
        run_attention(64, DEVICE)
        == f"eager: float32 attention is given to scaled_dot_product_attention ({FP32_ATTENTION_VAR}=sdpa)"
    )
    monkeypatch.setenv(FP32_ATTENTION_VAR, "fast")
    with pytest.raises(ValueError, match=f"{FP32_ATTENTION_VAR} is 'fast'; expected one of \\('tf32x3', 'sdpa'\\)"):
        run_attention(64, DEVICE)


def test_float32_attention_beyond_head_dim_64_goes_to_sdpa(monkeypatch):
    monkeypatch.delenv(FP32_ATTENTION_VAR, raising=False)
    assert run_attention(96, DEVICE) == "eager: float32 with head_dim 96 > 64: the kernel would spill registers"


@pytest.mark.parametrize(
    "n_q, programs, rows",
    [(3136, 256, 128), (3136, 1, 64), (784, 768, 128), (197, 1536, 128), (50, 4096, 64), (197, 6, 64)],
)
def test_attention_takes_128_row_tiles_with_two_waves_and_little_padding(n_q, programs, rows):
    config = attention.default_config(n_q, n_q // 4, 64, torch.bfloat16, programs, 132, interpreter=False)
    assert config.block_m == rows


def test_conv_table_fits_its_warps_to_the_tile():
    assert conv_projection.default_config(3136, 64, interpreter=False) == conv_projection.ConvConfig(32, 64, 4, 1)
    assert conv_projection.default_config(3136, 40, interpreter=False) == conv_projection.ConvConfig(32, 64, 4, 1)
    assert conv_projection.default_config(3136, 24, interpreter=False) == conv_projection.ConvConfig(32, 32, 2, 1)
