"""Checkpoints both ways: transformers writes, cvt_fast reads, and the reverse; refusals name the keys."""

import builtins
import json
import logging

import pytest
import torch

import cvt_fast
from cvt_fast import CheckpointError, CvtForImageClassification, CvtModel
from cvt_fast.testing import randomize_

from support.helpers import rel_err

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

SMALL = dict(depth=[1, 2, 3], embed_dim=[16, 24, 32], num_heads=[1, 2, 2], num_labels=5)


@pytest.fixture
def hf_classifier():
    model = transformers.CvtForImageClassification(transformers.CvtConfig(**SMALL))
    return randomize_(model, torch.Generator().manual_seed(0)).eval()


def outputs_agree(ours, theirs, head=True):
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        if head:
            return rel_err(ours(x).logits, theirs(x).logits) < 2e-5
        return rel_err(ours(x).last_hidden_state, theirs(x).last_hidden_state) < 2e-5


def test_loads_transformers_safetensors(tmp_path, hf_classifier):
    hf_classifier.save_pretrained(tmp_path)
    ours = CvtForImageClassification.from_pretrained(tmp_path)
    assert not ours.training
    assert outputs_agree(ours, hf_classifier)
    assert ours.config.num_labels == 5


def test_loads_sharded_safetensors(tmp_path, hf_classifier):
    hf_classifier.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert outputs_agree(CvtForImageClassification.from_pretrained(tmp_path), hf_classifier)


@pytest.mark.parametrize("sharded", [False, True])
def test_loads_pytorch_model_bin(tmp_path, hf_classifier, sharded):
    hf_classifier.config.save_pretrained(tmp_path)
    state = hf_classifier.state_dict()
    if sharded:
        keys = list(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, shard_keys in shards.items():
            torch.save({k: state[k] for k in shard_keys}, tmp_path / name)
        weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    assert outputs_agree(CvtForImageClassification.from_pretrained(tmp_path), hf_classifier)


class FileMakingPayload:
    """Unpickled, it runs code that creates `marker`: whether the file exists afterwards says whether it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


def test_bin_loading_never_unpickles_code(tmp_path, hf_classifier):
    checkpoint, marker = tmp_path / "checkpoint", tmp_path / "payload-ran"
    hf_classifier.config.save_pretrained(checkpoint)
    torch.save({"x": FileMakingPayload(marker)}, checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as refusal:
        CvtForImageClassification.from_pretrained(checkpoint)
    assert not marker.exists(), "the checkpoint's code ran"
    message = str(refusal.value)
    assert message.startswith(f"{checkpoint / 'pytorch_model.bin'}: refused, it holds Python objects")
    assert "Unsupported global: GLOBAL exec" in message
    # torch's own message advises weights_only=False (running the file's code): never passed on, not even chained
    assert "False" not in message and "safe_globals" not in message and refusal.value.__cause__ is None
    # The payload is live: the unsafe way of reading the file runs it (so the check above could have failed).
    torch.load(checkpoint / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_transformers_loads_what_we_save(tmp_path):
    ours = randomize_(CvtForImageClassification(cvt_fast.CvtConfig(**SMALL)), torch.Generator().manual_seed(1))
    ours.eval().save_pretrained(tmp_path)
    theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path).eval()
    assert outputs_agree(ours, theirs)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CvtForImageClassification"] and config["model_type"] == "cvt"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_permissions_a_plain_open_gives(tmp_path, umask):
    """safetensors creates its file readable by its owner only; a checkpoint folder is often shared. The umask is
    read without being changed (another thread may be creating files meanwhile)."""
    import os
    import stat

    from cvt_fast.files import current_umask

    before = os.umask(umask)
    try:
        assert current_umask() == umask
        CvtForImageClassification(cvt_fast.CvtConfig(**SMALL)).save_pretrained(tmp_path)
        assert current_umask() == umask
    finally:
        os.umask(before)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize(
    "config, named",
    [
        (dict(depth=[1, 1, 1]), "depth [1, 1, 1]: stage 1 is not deeper than its index"),
        (dict(qkv_projection_method=["dw_bn", "avg", "dw_bn"]), "qkv_projection_method 'avg'"),
        (dict(cls_token=[True, False, True]), "a cls token on stage 0"),
    ],
)
def test_a_checkpoint_transformers_cannot_run_is_saved_with_a_warning_naming_why(tmp_path, caplog, config, named):
    """cvt_fast runs configs transformers cannot (as the original CvT did); saving one says so, naming the field, and
    transformers indeed fails on it."""
    kwargs = dict(embed_dim=[16, 24, 32], num_heads=[1, 2, 2], depth=[1, 2, 3], num_labels=3) | config
    ours = randomize_(CvtForImageClassification(cvt_fast.CvtConfig(**kwargs)), torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="cvt_fast"):
        ours.eval().save_pretrained(tmp_path)
    warned = [r.getMessage() for r in caplog.records if "transformers cannot run" in r.getMessage()]
    assert len(warned) == 1 and named in warned[0], caplog.text
    assert CvtForImageClassification.from_pretrained(tmp_path).config.depth == kwargs["depth"]
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises on it (IndexError, AttributeError, ...)
        theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path).eval()
        theirs(torch.randn(1, 3, 64, 64))


def test_a_checkpoint_transformers_runs_is_saved_without_that_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="cvt_fast"):
        CvtModel(cvt_fast.CvtConfig(**SMALL)).save_pretrained(tmp_path)
    assert "transformers cannot run" not in caplog.text


def test_round_trip_through_our_own_format(tmp_path):
    ours = randomize_(CvtModel(cvt_fast.CvtConfig(**SMALL)), torch.Generator().manual_seed(2)).eval()
    ours.save_pretrained(tmp_path)
    again = CvtModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_backbone_from_a_classifier_checkpoint(tmp_path, hf_classifier):
    hf_classifier.save_pretrained(tmp_path)
    backbone = CvtModel.from_pretrained(tmp_path)
    assert outputs_agree(backbone, hf_classifier.cvt, head=False)


def test_classifier_from_a_backbone_checkpoint_needs_consent(tmp_path, hf_classifier, caplog):
    hf_classifier.cvt.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing keys \(.*classifier\.weight.*strict=False"):
        CvtForImageClassification.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cvt_fast"):
        model = CvtForImageClassification.from_pretrained(tmp_path, strict=False)
    assert "newly initialised" in caplog.text and "classifier.weight" in caplog.text
    assert not model.classifier.weight.is_meta and model.classifier.weight.abs().sum() > 0


def test_mis_shaped_keys_are_named(tmp_path, hf_classifier, caplog):
    hf_classifier.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"classifier\.weight: checkpoint \(5, 32\), model \(10, 32\)"):
        CvtForImageClassification.from_pretrained(tmp_path, num_labels=10)
    with caplog.at_level(logging.WARNING, logger="cvt_fast"):
        model = CvtForImageClassification.from_pretrained(tmp_path, num_labels=10, ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (10, 32) and "classifier.weight" in caplog.text
    backbone_key = "cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight"
    assert torch.equal(model.state_dict()[backbone_key], hf_classifier.state_dict()[backbone_key])


def test_unexpected_keys_are_named(tmp_path, hf_classifier):
    hf_classifier.config.save_pretrained(tmp_path)
    state = dict(hf_classifier.state_dict())
    state["cvt.encoder.stages.0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(cvt\.encoder\.stages\.0\.extra\.weight\)"):
        CvtForImageClassification.from_pretrained(tmp_path)


def test_missing_batchnorm_step_counters_are_fine(tmp_path, hf_classifier):
    hf_classifier.config.save_pretrained(tmp_path)
    state = {k: v for k, v in hf_classifier.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert outputs_agree(CvtForImageClassification.from_pretrained(tmp_path), hf_classifier)


def test_dtype_and_backend_arguments(tmp_path, hf_classifier):
    hf_classifier.save_pretrained(tmp_path)
    model = CvtForImageClassification.from_pretrained(tmp_path, dtype=torch.float64, backend="eager")
    assert model.dtype == torch.float64 and model.backend == "eager"
    assert CvtForImageClassification.from_pretrained(tmp_path, torch_dtype="float16").dtype == torch.float16
    assert CvtForImageClassification.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("config_says", ["dtype", "torch_dtype", "nothing"])
def test_dtype_auto_keeps_the_checkpoints_dtype(tmp_path, hf_classifier, dtype, config_says):
    """dtype="auto" reads the dtype as transformers does: config.json's dtype (torch_dtype in files older
    transformers wrote), else the weights' own; transformers' from_pretrained is the oracle."""
    hf_classifier.to(dtype).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    written = config.pop("dtype")
    assert written == str(dtype).removeprefix("torch.")
    if config_says != "nothing":
        config[config_says] = written
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path, dtype="auto")
    ours = CvtForImageClassification.from_pretrained(tmp_path, dtype="auto")
    assert ours.dtype == theirs.dtype == dtype
    our_state = ours.state_dict()
    for key, value in theirs.state_dict().items():  # the checkpoint's values, never rounded through float32
        assert our_state[key].dtype == value.dtype and torch.equal(our_state[key], value), key
    assert CvtForImageClassification.from_pretrained(tmp_path).dtype == torch.float32  # without "auto": float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_half_precision_save_loads_back_in_its_dtype(tmp_path, dtype):
    ours = randomize_(CvtForImageClassification(cvt_fast.CvtConfig(**SMALL)), torch.Generator().manual_seed(3))
    ours.to(dtype).save_pretrained(tmp_path)
    assert transformers.CvtForImageClassification.from_pretrained(tmp_path, dtype="auto").dtype == dtype
    again = CvtForImageClassification.from_pretrained(tmp_path, dtype="auto")
    assert again.dtype == dtype
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_no_weights_and_no_directory(tmp_path):
    cvt_fast.CvtConfig().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights in"):
        CvtModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        CvtModel.from_pretrained(tmp_path / "does-not-exist")


def test_unknown_keyword_is_refused(tmp_path, hf_classifier):
    hf_classifier.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="unexpected arguments \\['num_lables'\\]"):
        CvtForImageClassification.from_pretrained(tmp_path, num_lables=3)


def test_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        CvtForImageClassification.from_pretrained("microsoft/cvt-13")


def test_hub_id_goes_through_snapshot_download(monkeypatch, tmp_path, hf_classifier):
    hf_classifier.save_pretrained(tmp_path)
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = CvtForImageClassification.from_pretrained("someone/my-cvt", revision="v1")
    assert calls == [("someone/my-cvt", {"revision": "v1"})]
    assert outputs_agree(model, hf_classifier)


def test_partial_module_keeps_what_was_loaded(tmp_path, hf_classifier):
    """strict=False initialises only the missing tensors, not the rest of their module."""
    hf_classifier.config.save_pretrained(tmp_path)
    state = dict(hf_classifier.state_dict())
    layer = "cvt.encoder.stages.1.layers.0.attention.attention"
    bn = f"{layer}.convolution_projection_key.convolution_projection.normalization"
    del state["classifier.bias"], state[f"{bn}.running_mean"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = CvtForImageClassification.from_pretrained(tmp_path, strict=False)
    loaded = model.state_dict()
    for key in ("classifier.weight", f"{bn}.weight", f"{bn}.bias", f"{bn}.running_var"):
        assert torch.equal(loaded[key], state[key]), key
    assert torch.equal(loaded["classifier.bias"], torch.zeros(5))  # transformers' initialisation
    assert torch.equal(loaded[f"{bn}.running_mean"], torch.zeros(24))


def test_resaving_into_the_folder_it_was_loaded_from(tmp_path, hf_classifier):
    hf_classifier.config.save_pretrained(tmp_path)
    torch.save(hf_classifier.state_dict(), tmp_path / "pytorch_model.bin")
    model = CvtForImageClassification.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path, safe_serialization=False)  # overwrites the file the weights came from
    assert outputs_agree(CvtForImageClassification.from_pretrained(tmp_path), hf_classifier)


# ---- refusals that name the file ------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A small cvt_fast checkpoint folder and the model it holds."""
    model = randomize_(CvtForImageClassification(cvt_fast.CvtConfig(**SMALL)), torch.Generator().manual_seed(4))
    model.eval().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def folder_snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "not a readable safetensors file .*truncated or corrupt"),
        (lambda b: b"", "not a readable safetensors file"),
        (lambda b: b"\xff" * 64, "not a readable safetensors file"),
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_a_damaged_safetensors_file_is_named(saved, damage, message):
    directory, _ = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    before = folder_snapshot(directory)
    with pytest.raises(CheckpointError, match=f"^{weights}: {message}"):
        CvtForImageClassification.from_pretrained(directory)
    assert folder_snapshot(directory) == before


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty, so not a PyTorch checkpoint"),
        (b"PK\x03\x04 a zip that stops here", "a damaged zip archive, not a readable PyTorch checkpoint"),
        (b"this is not a zip archive at all", "not a PyTorch checkpoint of tensors, neither a zip archive"),
    ],
    ids=["empty", "truncated zip", "not a zip"],
)
def test_a_bin_that_is_not_a_checkpoint_is_named(saved, content, message):
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{directory / 'pytorch_model.bin'}: {message}"):
        CvtForImageClassification.from_pretrained(directory)


@pytest.mark.parametrize(
    "contents, message",
    [
        ([1, 2, 3], "holds list, expected a dict of tensor names to tensors"),
        ({"classifier.weight": [1.0, 2.0]}, "entry 'classifier.weight' is list, expected a tensor"),
        ({"classifier.weight": torch.ones(5, 32, dtype=torch.int64)}, "classifier.weight is torch.int64, expected"),
        ({"classifier.weight": torch.ones(5, 32, dtype=torch.complex64)}, "classifier.weight is torch.complex64"),
    ],
    ids=["a list", "a list as a tensor", "integer weights", "complex weights"],
)
def test_a_bin_of_something_else_than_float_tensors_is_named(saved, contents, message):
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    torch.save(contents, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"^{directory / 'pytorch_model.bin'}: {message}"):
        CvtForImageClassification.from_pretrained(directory)


@pytest.mark.parametrize(
    "index, message",
    [
        ("{not json", r"is not valid JSON \(Expecting property name enclosed in double quotes at line 1 column 2\)"),
        ("[]", r"expected a JSON object \(\{\.\.\.\}\), got list \[\]"),
        ('{"metadata": {}}', 'expected a "weight_map" object of tensor names to shard file names'),
        ('{"weight_map": {"a": 3}}', 'expected a "weight_map" object'),
        ('{"weight_map": {"a": "../../etc/passwd"}}', r"shards must be file names in .*, got \.\./\.\./etc/passwd"),
        ('{"weight_map": {"a": "model-2.safetensors"}}', "names shards that are not there: model-2.safetensors"),
    ],
    ids=["bad JSON", "not an object", "no weight_map", "shard not a name", "shard elsewhere", "shard missing"],
)
def test_a_bad_index_is_named(saved, index, message):
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=f"^{directory / 'model.safetensors.index.json'}:? {message}"):
        CvtForImageClassification.from_pretrained(directory)


def test_a_key_in_two_shards_is_named(saved):
    directory, model = saved
    from safetensors.torch import save_file

    state = model.state_dict()
    keys = list(state)
    save_file({k: state[k] for k in keys[:10]}, str(directory / "a.safetensors"))
    save_file({k: state[k] for k in keys[9:]}, str(directory / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in keys[:10]} | {k: "b.safetensors" for k in keys[10:]}
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expected = f"{keys[9]} is in two shards, {directory / 'a.safetensors'} and {directory / 'b.safetensors'}"
    with pytest.raises(CheckpointError, match=f"^{expected}$"):
        CvtForImageClassification.from_pretrained(directory)


def test_a_config_json_that_is_not_json_is_named(saved):
    directory, _ = saved
    (directory / "config.json").write_text('{"depth": [1, 2, 3],}')
    with pytest.raises(cvt_fast.ConfigError, match=f"^{directory / 'config.json'}: is not valid JSON"):
        CvtForImageClassification.from_pretrained(directory)


def test_a_nonsense_config_value_is_named_with_its_file(saved):
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "mlp_ratio": [4.0, -2.0, 4.0]}))
    with pytest.raises(cvt_fast.ConfigError) as refusal:
        CvtForImageClassification.from_pretrained(directory)
    assert str(refusal.value) == f"{directory / 'config.json'}: stage 1: mlp_ratio must be at least 0, got -2.0"


def test_the_missing_key_remedy_is_kept_apart_for_the_command_line(saved):
    directory, _ = saved
    with pytest.raises(CheckpointError) as refusal:
        CvtForImageClassification.from_pretrained(directory, num_labels=7)
    assert "strict" not in refusal.value.problem and "ignore_mismatched_sizes" not in refusal.value.problem
    assert refusal.value.remedy == "from_pretrained: ignore_mismatched_sizes=True re-initialises mis-shaped keys"
    assert str(refusal.value) == f"{refusal.value.problem} ({refusal.value.remedy})"


# ---- names that reach no checkpoint ---------------------------------------------------------------------------


def test_an_empty_name_is_not_the_working_directory(tmp_path, monkeypatch, hf_classifier):
    hf_classifier.save_pretrained(tmp_path)  # a checkpoint right there, which "" used to load
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(cvt_fast.CheckpointNotFoundError, match="^an empty name is not a checkpoint"):
            CvtForImageClassification.from_pretrained(empty)


def test_a_file_is_not_a_checkpoint_directory(saved):
    directory, _ = saved
    with pytest.raises(FileNotFoundError, match="config.json' is a file, not a checkpoint directory"):
        CvtForImageClassification.from_pretrained(directory / "config.json")


def test_a_name_that_is_neither_a_folder_nor_on_the_hub_says_both(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def unreachable(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cvt_fast.CheckpointNotFoundError) as refusal:
        CvtForImageClassification.from_pretrained("ckpt_typo")
    assert str(refusal.value) == (
        f"'ckpt_typo' is not a checkpoint directory (there is no folder {tmp_path / 'ckpt_typo'}) and could not be "
        "fetched from the Hugging Face Hub either (Got: ConnectError: [Errno -2] Name or service not known)"
    )
    assert isinstance(refusal.value, FileNotFoundError) and isinstance(refusal.value, CheckpointError)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(device="gpu"), ValueError, "device 'gpu' is not a device name"),
        (dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), ValueError, "is not available on this"),
        (dict(dtype="int8"), ValueError, "dtype 'int8' is not a floating-point torch dtype"),
        (dict(dtype="half_precision"), ValueError, "dtype 'half_precision' is not a floating-point torch dtype"),
        (dict(dtype=16), TypeError, "dtype must be a torch.dtype, a name such as 'float16', or 'auto'; got int"),
        (dict(config={"depth": [1]}), TypeError, "config must be a cvt_fast.CvtConfig, got dict"),
    ],
)
def test_bad_arguments_are_refused_before_the_weights_are_read(saved, monkeypatch, kwargs, error, message):
    directory, _ = saved
    monkeypatch.setattr(cvt_fast.loading, "read_state_dict", lambda files: pytest.fail("the weights were read"))
    with pytest.raises(error, match=message):
        CvtForImageClassification.from_pretrained(directory, **kwargs)


def test_dtype_auto_names_a_bad_dtype_in_config_json(saved):
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "dtype": "float99"}))
    with pytest.raises(cvt_fast.ConfigError, match="config.json's dtype 'float99' \\(read for dtype='auto'\\)"):
        CvtForImageClassification.from_pretrained(directory, dtype="auto")


# ---- saving never leaves a half-written checkpoint -------------------------------------------------------------


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_a_failed_save_leaves_the_previous_checkpoint(saved, monkeypatch, safe_serialization):
    directory, model = saved
    before = folder_snapshot(directory)

    def disk_full(state_dict, path, safe_serialization):
        path.write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cvt_fast.loading, "_write_weights", disk_full)
    other = randomize_(CvtForImageClassification(cvt_fast.CvtConfig(**SMALL)), torch.Generator().manual_seed(5))
    with pytest.raises(cvt_fast.CheckpointWriteError) as refusal:
        other.save_pretrained(directory, safe_serialization=safe_serialization)
    assert str(refusal.value) == (
        f"cannot save a checkpoint in {directory} ([Errno 28] No space left on device); "
        "what the folder held is left as it was"
    )
    assert isinstance(refusal.value, OSError)
    assert folder_snapshot(directory) == before  # the same files, byte for byte, and no temporary left behind
    monkeypatch.undo()
    assert outputs_agree(CvtForImageClassification.from_pretrained(directory), model)


def test_saving_into_a_file_is_refused(saved):
    directory, model = saved
    with pytest.raises(cvt_fast.CheckpointWriteError, match="config.json: cannot be made a checkpoint folder"):
        model.save_pretrained(directory / "config.json")


@pytest.mark.parametrize("first_safe", [True, False])
def test_a_save_replaces_weights_of_the_other_format(tmp_path, first_safe):
    """Otherwise model.safetensors from an earlier save would be loaded instead of a newer pytorch_model.bin."""
    first, second = (
        randomize_(CvtForImageClassification(cvt_fast.CvtConfig(**SMALL)), torch.Generator().manual_seed(seed)).eval()
        for seed in (6, 7)
    )
    first.save_pretrained(tmp_path, safe_serialization=first_safe)
    second.save_pretrained(tmp_path, safe_serialization=not first_safe)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "pytorch_model.bin" if first_safe else "model.safetensors"]
    assert outputs_agree(CvtForImageClassification.from_pretrained(tmp_path), second)


def test_a_save_removes_the_shards_of_an_earlier_sharded_checkpoint(tmp_path, hf_classifier):
    hf_classifier.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "notes.txt").write_text("not a weights file: kept")
    ours = CvtForImageClassification.from_pretrained(tmp_path)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert outputs_agree(CvtForImageClassification.from_pretrained(tmp_path), hf_classifier)


def test_a_damaged_bin_adds_no_warning_to_its_refusal(saved):
    """torch warns about the 'pickle protocol' a damaged file's first bytes spell: noise beside the one line."""
    import warnings

    directory, _ = saved
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"\x80\xd3 damaged")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="not a PyTorch checkpoint of tensors"):
            CvtForImageClassification.from_pretrained(directory)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.float32])
def test_step_counters_of_another_dtype_load_as_the_models_int64(saved, dtype):
    """As load_state_dict's copy would: a bool counter kept as is would fail at the first training step."""
    from safetensors.torch import load_file, save_file

    directory, _ = saved
    weights = load_file(str(directory / "model.safetensors"))
    counters = [k for k in weights if k.endswith("num_batches_tracked")]
    weights = {k: v.to(dtype) if k in counters else v for k, v in weights.items()}
    save_file(weights, str(directory / "model.safetensors"))
    model = CvtForImageClassification.from_pretrained(directory)
    assert {model.state_dict()[k].dtype for k in counters} == {torch.int64}
    model.train()(torch.randn(2, 3, 48, 40)).logits.sum().backward()
