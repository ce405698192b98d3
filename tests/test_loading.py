"""Checkpoints both ways: transformers writes, cvt_fast reads, and the reverse; refusals name the keys."""

import builtins
import json
import logging

import pytest
import torch

import cvt_fast
from cvt_fast import CheckpointError, CvtForImageClassification, CvtModel
from cvt_fast.testing import randomize_

from helpers import rel_err

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


def test_bin_loading_never_unpickles_code(tmp_path, hf_classifier):
    hf_classifier.config.save_pretrained(tmp_path)

    class Payload:
        def __reduce__(self):
            return (builtins.print, ("code from a checkpoint ran",))

    torch.save({"x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        CvtForImageClassification.from_pretrained(tmp_path)


def test_transformers_loads_what_we_save(tmp_path):
    ours = randomize_(CvtForImageClassification(cvt_fast.CvtConfig(**SMALL)), torch.Generator().manual_seed(1))
    ours.eval().save_pretrained(tmp_path)
    theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path).eval()
    assert outputs_agree(ours, theirs)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CvtForImageClassification"] and config["model_type"] == "cvt"


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
