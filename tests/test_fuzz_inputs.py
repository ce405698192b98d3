"""Fuzzing what a user hands cvt_fast: config.json contents, checkpoint files and command lines. Whatever the input,
the outcome is either success (a model that runs) or cvt_fast's own exception (exit status 2 for the command line)
with a message that names the file or field at fault; never an internal error, and never a half-loaded model or a
half-written checkpoint left behind.

Examples are bounded for CI (2 cores): CVT_FAST_FUZZ_EXAMPLES raises the count. Under CI the examples are the same on
every run (derandomized); elsewhere each run explores new ones.
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import cvt_fast  # noqa: E402
from cvt_fast import CheckpointError, ConfigError, CvtConfig, CvtForImageClassification, cli  # noqa: E402
from cvt_fast.checks import check_image_size  # noqa: E402
from cvt_fast.config import STAGE_INTEGER_MINIMUM, STAGE_PARAMETERS  # noqa: E402
from cvt_fast.testing import randomize_  # noqa: E402
from cvt_fast.tools import benchmark  # noqa: E402

pytestmark = [
    pytest.mark.unit,
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning"),
]  # mlp_ratio 0

FUZZ = settings(
    max_examples=int(os.environ.get("CVT_FAST_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# A valid two-stage config, small enough that building and running it costs milliseconds.
BASE = {
    "depth": [1, 2],
    "embed_dim": [4, 6],
    "num_heads": [1, 2],
    "patch_sizes": [3, 3],
    "patch_stride": [2, 2],
    "patch_padding": [1, 1],
    "mlp_ratio": [2.0, 1.0],
    "cls_token": [False, True],
    "num_labels": 3,
}

# JSON values a careless config.json may hold: plausible ones (small, so a config that passes stays cheap to run),
# and nonsense of every JSON type.
SCALARS = st.one_of(
    st.integers(-2, 5),
    st.floats(-1.5, 2.5),
    st.sampled_from([0.0, 1.0, 0.5, 1e-9, float("nan"), float("inf"), -0.0]),
    st.booleans(),
    st.none(),
    st.sampled_from(["dw_bn", "avg", "linear", "conv", "", "3", "true"]),
)
JSON_VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(st.sampled_from(["0", "1", "a", "shortest_edge"]), SCALARS, max_size=3),
)
FIELDS = [*STAGE_PARAMETERS, "num_channels", "initializer_range", "layer_norm_eps", "num_labels", "id2label",
          "label2id", "problem_type", "output_hidden_states", "return_dict", "model_type", "unknown_key"]  # fmt: skip
# Plausible values too, most of which pass, so that accepted configs are fuzzed as well as refused ones.
STAGE_VALUES = {
    **dict.fromkeys(STAGE_INTEGER_MINIMUM, st.integers(0, 4)),
    **dict.fromkeys(["attention_drop_rate", "drop_rate", "drop_path_rate"], st.floats(0, 1)),
    "mlp_ratio": st.floats(0, 3),
    "qkv_bias": st.booleans(),
    "cls_token": st.booleans(),
    "qkv_projection_method": st.sampled_from(["dw_bn", "avg", "linear"]),
}
PLAUSIBLE = {
    **{name: st.lists(values, min_size=2, max_size=3) for name, values in STAGE_VALUES.items()},
    "num_channels": st.integers(1, 4),
    "initializer_range": st.floats(1e-3, 1),
    "num_labels": st.integers(0, 5),
}
CONFIG_EDITS = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=3) | st.fixed_dictionaries(
    {}, optional=PLAUSIBLE
).filter(bool)


def smallest_image(config: CvtConfig, limit: int = 96) -> int | None:
    """The smallest square image this config accepts, if there is one up to `limit` pixels."""
    for size in range(1, limit + 1):
        try:
            check_image_size(config, size, size)
            return size
        except ValueError:
            continue
    return None


def names_a_field(message: str, fields) -> bool:
    return any(field in message for field in fields)


@FUZZ
@given(edits=CONFIG_EDITS)
def test_config_json_is_refused_naming_a_field_or_builds_a_model_that_runs(edits):
    data = {**BASE, **edits}
    if "num_labels" in edits and "id2label" not in edits:
        data.pop("id2label", None)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(data))
        try:
            config = CvtConfig.from_pretrained(directory)
        except ConfigError as error:
            message = str(error)
            assert message.startswith(f"{path}: ") and "\n" not in message
            # A refusal names a field the edit touched (per-stage counts name depth, via "len(depth)").
            assert names_a_field(message, [*edits, "model_type"]), message
            event("refused")
            return
    event("accepted")
    # Accepted: the model builds, trains a step's forward, and runs in eval with finite outputs.
    size = smallest_image(config)
    model = CvtForImageClassification(config)  # its own initialisation: randomize_ has no scale for 0-size weights
    if size is None:
        return
    x = torch.randn(2, config.num_channels, size, size)
    model.train()(x, return_dict=True)
    with torch.no_grad():
        logits = model.eval()(x, return_dict=True).logits
    assert logits.shape == (2, config.num_labels) or config.num_labels == 0
    assert torch.isfinite(logits).all()
    assert CvtConfig.from_dict(json.loads(config.to_json_string())) == config  # and it round-trips


# ---- checkpoint files ---------------------------------------------------------------------------------------

TINY = CvtConfig(depth=[1], embed_dim=[4], num_heads=[1], cls_token=[True], num_labels=2)


class Checkpoint(tuple):
    """(folder, state dict), shown by its folder alone in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Checkpoint({self[0]})"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good") / "ckpt"
    model = randomize_(CvtForImageClassification(TINY), torch.Generator().manual_seed(1)).eval()
    model.save_pretrained(directory)
    return Checkpoint((directory, model.state_dict()))


DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float16, torch.bfloat16, torch.float64,
          torch.complex64]  # fmt: skip


class Damaged(dict):
    """A damaged state dict, shown in hypothesis' reports by what was done to it."""

    def __init__(self, state, changes):
        super().__init__(state)
        self.changes = changes

    def __repr__(self) -> str:
        return f"Damaged({self.changes})"


@st.composite
def damaged_state_dicts(draw, state):
    """The state dict with some keys dropped, renamed, given extra entries, other dtypes or other shapes."""
    state, changes = dict(state), []
    for key in draw(st.lists(st.sampled_from(sorted(state)), max_size=3, unique=True)):
        change = draw(st.sampled_from(["drop", "rename", "dtype", "shape", "scalar"]))
        tensor = state.pop(key)
        if change == "rename":
            state[key + ".extra"] = tensor
        elif change == "dtype":
            state[key] = tensor.to(draw(st.sampled_from(DTYPES)))
        elif change == "shape":
            state[key] = torch.randn(tuple(draw(st.lists(st.integers(0, 5), max_size=3))))
        elif change == "scalar":
            state[key] = torch.tensor(draw(st.floats(-1, 1)))
        changes.append((change, key, tuple(state.get(key, tensor).shape), state.get(key, tensor).dtype))
    if draw(st.booleans()):
        extra = draw(st.sampled_from(["extra.weight", "cvt.extra", "classifier.weight.x"]))
        state[extra] = torch.randn(3)
        changes.append(("add", extra))
    return Damaged(state, changes)


def write_state(directory: Path, state: dict, fmt: str, shards: int, draw_index) -> None:
    """Write `state` as model.safetensors or pytorch_model.bin, in `shards` pieces with an index when above one."""
    from safetensors.torch import save_file

    suffix, single, index = {
        "safetensors": (".safetensors", "model.safetensors", "model.safetensors.index.json"),
        "bin": (".bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    }[fmt]

    def save(tensors, path):
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        else:
            torch.save(tensors, path)

    if shards == 1:
        save(state, directory / single)
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}{suffix}"
        part = keys[i::shards]
        save({k: state[k] for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / index).write_text(draw_index(weight_map))


@st.composite
def index_texts(draw, weight_map):
    """The index as written, or damaged: not JSON, another JSON value, a shard that is missing or outside."""
    choice = draw(st.sampled_from(["good", "good", "not json", "other json", "missing shard", "outside", "bad map"]))
    if choice == "not json":
        return json.dumps({"weight_map": weight_map})[: draw(st.integers(0, 40))]
    if choice == "other json":
        return json.dumps(draw(JSON_VALUES))
    if choice == "missing shard":
        return json.dumps({"weight_map": {**weight_map, "extra.weight": "model-00009-of-00009.safetensors"}})
    if choice == "outside":
        return json.dumps({"weight_map": {**weight_map, "extra.weight": "../../config.json"}})
    if choice == "bad map":
        return json.dumps({"weight_map": draw(JSON_VALUES)})
    return json.dumps({"metadata": {}, "weight_map": weight_map})


@st.composite
def damaged_files(draw, raw: bytes):
    """A weights file's bytes: truncated, emptied, with bytes overwritten, or replaced by something else."""
    choice = draw(st.sampled_from(["truncate", "empty", "overwrite", "random", "zip-like", "pickle-like"]))
    if choice == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if choice == "empty":
        return b""
    if choice == "overwrite":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            position = draw(st.integers(0, min(len(raw) - 1, 200)))  # mostly the header, where damage matters
            data[position] = draw(st.integers(0, 255))
        return bytes(data)
    prefix = {"random": b"", "zip-like": b"PK\x03\x04", "pickle-like": b"\x80\x02"}[choice]
    return prefix + draw(st.binary(max_size=64))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def check_load(directory: Path, **kwargs) -> None:
    """Load; a refusal must be a CheckpointError that names the folder (or a file in it), and touch nothing; a
    success must be a whole model."""
    before = snapshot(directory)
    try:
        model = CvtForImageClassification.from_pretrained(directory, **kwargs)
    except CheckpointError as error:
        assert str(directory) in str(error) and "\n" not in str(error), str(error)
        assert "weights_only=False" not in str(error) and "weights_only` set to `False" not in str(error)
        assert snapshot(directory) == before
        return
    assert snapshot(directory) == before
    for name, tensor in model.state_dict().items():
        assert not tensor.is_meta, name
        assert tensor.dtype == torch.float32 or name.endswith("num_batches_tracked") and tensor.dtype == torch.int64
    with torch.no_grad():
        assert model(torch.randn(1, 3, 20, 20)).logits.shape == (1, 2)


@FUZZ
@given(data=st.data())
def test_checkpoint_state_dicts_with_wrong_keys_dtypes_shapes_and_indexes(good_checkpoint, data):
    source, state = good_checkpoint
    damaged = data.draw(damaged_state_dicts(state))
    fmt = data.draw(st.sampled_from(["safetensors", "bin"]))
    shards = data.draw(st.integers(1, 3))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        directory.mkdir()
        shutil.copy(source / "config.json", directory)
        write_state(directory, damaged, fmt, shards, lambda weight_map: data.draw(index_texts(weight_map)))
        check_load(directory, strict=data.draw(st.booleans()), ignore_mismatched_sizes=data.draw(st.booleans()))


@FUZZ
@given(data=st.data())
def test_damaged_weights_files(good_checkpoint, data):
    source, state = good_checkpoint
    fmt = data.draw(st.sampled_from(["safetensors", "bin"]))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        directory.mkdir()
        shutil.copy(source / "config.json", directory)
        write_state(directory, state, fmt, 1, json.dumps)
        weights = directory / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
        weights.write_bytes(data.draw(damaged_files(weights.read_bytes())))
        check_load(directory)


@FUZZ
@given(
    python_objects=st.recursive(
        st.one_of(st.integers(), st.text(max_size=5), st.none(), st.floats()),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    )
)
def test_a_bin_holding_python_objects_instead_of_tensors(good_checkpoint, python_objects):
    source, _ = good_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ckpt"
        directory.mkdir()
        shutil.copy(source / "config.json", directory)
        torch.save(python_objects, directory / "pytorch_model.bin")
        check_load(directory)


@FUZZ
@given(fail_in=st.sampled_from(["weights", "config"]), written=st.integers(0, 5000), safe=st.booleans())
def test_a_failed_save_leaves_the_good_checkpoint(good_checkpoint, fail_in, written, safe):
    source, _ = good_checkpoint
    other = randomize_(CvtForImageClassification(TINY), torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(shutil.copytree(source, Path(tmp) / "ckpt"))
        before = snapshot(directory)

        def fail_midway(*args, **kwargs):
            path = Path(args[1] if fail_in == "weights" else args[0])
            path.write_bytes(b"\0" * written)
            raise OSError(28, "No space left on device")

        target = "cvt_fast.loading._write_weights" if fail_in == "weights" else "pathlib.Path.write_text"
        with mock.patch(target, autospec=fail_in == "config", side_effect=fail_midway):
            with pytest.raises(cvt_fast.CheckpointWriteError, match=f"^cannot save a checkpoint in {directory} "):
                other.save_pretrained(directory, safe_serialization=safe)
        assert snapshot(directory) == before


# ---- command lines ------------------------------------------------------------------------------------------

NOT_A_NUMBER = st.sampled_from(["0", "-1", "-8", "x", "", "1.5", "2e3", "0x10"]) | st.integers(-(10**6), 0).map(str)
NOT_A_DEVICE = ["gpu", "cuda:99", "tpu", "", "cpu:x", "cuda:-1", "mps", "meta", "hpu"] + (
    [] if torch.cuda.is_available() else ["cuda"]
)
NAMES = st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=12)


def run_main(argv: list[str]) -> tuple[int, list[str]]:
    """main() in this process, with its output captured: (exit status, stderr lines)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = cli.main(argv)
        except SystemExit as exit:
            status = exit.code
    return status, stderr.getvalue().splitlines()


def nothing_runs():
    message = "the benchmark ran or the model loaded, though an argument was bad"
    return mock.patch.multiple(
        "cvt_fast.tools.benchmark", run=mock.Mock(side_effect=AssertionError(message))
    ), mock.patch.object(CvtForImageClassification, "from_pretrained", side_effect=AssertionError(message))


def assert_one_line_per_problem(status, lines, command, culprits):
    lines = [line for line in lines if not line.startswith("note: ")]  # information, not a problem
    assert status == 2, lines
    assert lines and all(line.startswith(f"cvt-fast {command}: ") for line in lines), lines
    assert any(culprit in line for line in lines for culprit in culprits), (lines, culprits)


@st.composite
def bad_bench_arguments(draw):
    """A bench command line with one to three bad arguments: (argv, what a refusal may name)."""
    bad = draw(st.sets(st.sampled_from(["--rounds", "--batches", "--sizes", "--models", "--implementations",
                                        "--dtypes", "--device"]), min_size=1, max_size=3))  # fmt: skip
    argv, culprits = [], []
    for option in sorted(bad):
        if option in ("--rounds", "--batches", "--sizes"):
            value = draw(NOT_A_NUMBER)
        elif option == "--models":
            value = draw(NAMES.filter(lambda name: name not in cvt_fast.PRESETS and not Path(name).exists()))
        elif option == "--implementations":
            value = draw(NAMES.filter(lambda name: name not in benchmark.IMPLEMENTATIONS))
        elif option == "--dtypes":
            value = draw(NAMES.filter(lambda name: name not in ("float32", "float16", "bfloat16")))
        else:
            value = draw(st.sampled_from(NOT_A_DEVICE))
        argv += [f"{option}={value}"]  # the = form: a value may start with "-"
        culprits.append(option)
    return argv, culprits


@FUZZ
@given(case=bad_bench_arguments())
def test_bad_bench_arguments_get_one_line_each_and_run_nothing(case):
    argv, culprits = case
    patch_run, patch_load = nothing_runs()
    with patch_run, patch_load:
        status, lines = run_main(["bench", *argv])
    assert_one_line_per_problem(status, lines, "bench", culprits)


@pytest.fixture(scope="module")
def classify_files(tmp_path_factory, good_checkpoint):
    root = tmp_path_factory.mktemp("classify-fuzz")
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "good.png")
    (root / "folder").mkdir()
    (root / "text.png").write_text("not an image")
    png = (root / "good.png").read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    return root, good_checkpoint[0]


@FUZZ
@given(data=st.data())
def test_bad_classify_arguments_get_one_line_each_and_load_nothing(classify_files, data):
    pytest.importorskip("PIL")
    root, checkpoint = classify_files
    bad = data.draw(st.sets(st.sampled_from(["--top-k", "--device", "--model", "--backend", "images"]), min_size=1))
    argv = ["classify"]
    culprits = []
    if "--top-k" in bad:
        argv.append(f"--top-k={data.draw(NOT_A_NUMBER)}")
        culprits.append("--top-k")
    if "--device" in bad:
        argv.append(f"--device={data.draw(st.sampled_from(NOT_A_DEVICE))}")
        culprits.append("--device")
    if "--backend" in bad:
        argv.append(f"--backend={data.draw(NAMES.filter(lambda b: b not in ('auto', 'eager', 'triton')))}")
        culprits.append("--backend")
    if "--model" in bad:
        model = data.draw(st.sampled_from(["", " ", str(root / "missing"), str(root / "good.png"), "./typo"]))
        culprits.append(model.strip() and model or "empty name")
    else:
        model = str(checkpoint)
    argv.append(f"--model={model}")
    images = [str(root / "good.png")]
    if "images" in bad:
        broken = data.draw(st.lists(st.sampled_from(["missing.png", "folder", "text.png", "cut.png"]), min_size=1))
        images += [str(root / name) for name in broken]
        culprits += [str(root / name) for name in broken]
    patch_run, patch_load = nothing_runs()
    with patch_run, patch_load:
        status, lines = run_main([*argv, *images])
    assert_one_line_per_problem(status, lines, "classify", culprits)
