"""The original CvT (microsoft/CvT): its checkpoints and specs load, and its numerics (QuickGELU, stochastic depth on
the branches at per-layer rates) reach every path. The oracle is tests/support/original_cvt.py, written from the
original's definition: its state_dict is a checkpoint in the original layout, made without cvt_fast's mapping."""

import copy
import sys

import pytest
import torch

import cvt_fast
from cvt_fast import CheckpointError, ConfigError, CvtForImageClassification, CvtModel
from cvt_fast.config import PRESETS
from cvt_fast.original import config_from_spec, spec_image_size
from cvt_fast.testing import randomize_

from support.helpers import rel_err
from support.original_cvt import SMALL_SPEC, OriginalCvT

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An original-layout model and its checkpoint file, as the original's training saves it (final_state.pth)."""
    model = randomize_(OriginalCvT(SMALL_SPEC, num_classes=10), torch.Generator().manual_seed(0)).double()
    path = tmp_path_factory.mktemp("original") / "final_state.pth"
    torch.save(model.float().state_dict(), path)
    return model.double().eval(), path


def pixels(batch=3, size=48, dtype=torch.float64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_an_original_checkpoint_loads_and_matches_the_definition(original):
    reference, path = original
    model = CvtForImageClassification.from_original(path, spec=SMALL_SPEC).double()
    assert model.config.hidden_act == "quick_gelu" and model.config.stochastic_depth == "original"
    assert model.config.num_labels == 10  # from the head's shape
    x = pixels()
    with torch.inference_mode():
        assert rel_err(model(x).logits, reference(x)) < 1e-12
        float32 = CvtForImageClassification.from_original(path, spec=SMALL_SPEC)(x.float()).logits
    assert rel_err(float32, reference(x)) < 2e-5  # the float32 rule


def test_training_drops_branches_at_per_layer_rates_as_the_original(original):
    """Training mode, the same seed: the original's stochastic depth (and BatchNorm on batch statistics) exactly;
    transformers' (the default) is another model in training."""
    reference, path = original
    ours = CvtForImageClassification.from_original(path, spec=SMALL_SPEC).double().train()
    reference = copy.deepcopy(reference).train()
    x = pixels(batch=8)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference(x)
        torch.manual_seed(seed)
        assert rel_err(ours(x).logits, expected) < 1e-12, seed
    transformers_like = CvtForImageClassification.from_original(path, spec=SMALL_SPEC, stochastic_depth="transformers")
    transformers_like = transformers_like.double().train()
    torch.manual_seed(0)
    expected = reference(x)
    torch.manual_seed(0)
    assert rel_err(transformers_like(x).logits, expected) > 1e-3


def test_quick_gelu_is_what_the_weights_were_trained_with(original):
    reference, path = original
    exact = CvtForImageClassification.from_original(path, spec=SMALL_SPEC, hidden_act="gelu").double()
    with torch.inference_mode():
        assert rel_err(exact(pixels()).logits, reference(pixels())) > 1e-3  # the activation matters at this scale


def test_a_backbone_loads_the_same_checkpoint_without_norm_and_head(original):
    reference, path = original
    backbone = CvtModel.from_original(path, spec=SMALL_SPEC).double()
    x = pixels()
    with torch.inference_mode():
        features, cls = backbone(x, return_dict=False)[:2]
        expected, _ = reference.stage0(x)
        expected, _ = reference.stage1(expected)
        expected, expected_cls = reference.stage2(expected)
    assert rel_err(features, expected) < 1e-12 and rel_err(cls, expected_cls) < 1e-12


def test_a_training_checkpoint_and_data_parallel_names_load(original, tmp_path):
    reference, _ = original
    state = {f"module.{k}": v.float() for k, v in reference.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state, "best_perf": 0.5}, tmp_path / "checkpoint.pth")
    model = CvtForImageClassification.from_original(tmp_path / "checkpoint.pth", spec=SMALL_SPEC).double()
    with torch.inference_mode():
        assert rel_err(model(pixels()).logits, reference(pixels())) < 1e-12


def test_a_yaml_spec_and_a_preset_name(original, tmp_path):
    yaml = pytest.importorskip("yaml")
    _, path = original
    (tmp_path / "cvt-small.yaml").write_text(
        yaml.safe_dump({"MODEL": {"NAME": "cls_cvt", "NUM_CLASSES": 10, "SPEC": {"INIT": "trunc_norm", **SMALL_SPEC}}})
    )
    from_yaml = CvtForImageClassification.from_original(path, spec=tmp_path / "cvt-small.yaml")
    assert from_yaml.config.embed_dim == SMALL_SPEC["DIM_EMBED"] and from_yaml.config.num_labels == 10
    assert config_from_spec("cvt-13") == config_from_spec(CVT_13_SPEC, num_labels=1000)
    assert config_from_spec("cvt-13").hidden_act == "quick_gelu"


# MODEL.SPEC of microsoft/CvT's experiments/imagenet/cvt/cvt-13-224x224.yaml, as published.
CVT_13_SPEC = {
    "INIT": "trunc_norm",
    "NUM_STAGES": 3,
    "PATCH_SIZE": [7, 3, 3],
    "PATCH_STRIDE": [4, 2, 2],
    "PATCH_PADDING": [2, 1, 1],
    "DIM_EMBED": [64, 192, 384],
    "NUM_HEADS": [1, 3, 6],
    "DEPTH": [1, 2, 10],
    "MLP_RATIO": [4.0, 4.0, 4.0],
    "ATTN_DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_PATH_RATE": [0.0, 0.0, 0.1],
    "QKV_BIAS": [True, True, True],
    "CLS_TOKEN": [False, False, True],
    "POS_EMBED": [False, False, False],
    "QKV_PROJ_METHOD": ["dw_bn", "dw_bn", "dw_bn"],
    "KERNEL_QKV": [3, 3, 3],
    "PADDING_KV": [1, 1, 1],
    "STRIDE_KV": [2, 2, 2],
    "PADDING_Q": [1, 1, 1],
    "STRIDE_Q": [1, 1, 1],
}


def test_a_preset_takes_the_same_overrides_as_a_spec():
    config = config_from_spec("cvt-13", hidden_act="gelu", stochastic_depth="transformers", num_labels=10)
    assert (config.hidden_act, config.stochastic_depth, config.num_labels) == ("gelu", "transformers", 10)
    assert config == config_from_spec(CVT_13_SPEC, hidden_act="gelu", stochastic_depth="transformers", num_labels=10)


@pytest.mark.parametrize("pyyaml", ["installed", "missing"])
def test_a_mistyped_preset_is_named_as_neither_a_file_nor_a_preset(monkeypatch, pyyaml):
    if pyyaml == "missing":
        monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml then raises ImportError
    message = ("cvt-31: neither a file nor a preset; expected a YAML spec file or one of the presets "
               "cvt-13, cvt-13-384, cvt-21, cvt-21-384, cvt-w24, cvt-w24-384")  # fmt: skip
    assert ", ".join(PRESETS) in message
    for read in (config_from_spec, spec_image_size):
        with pytest.raises(ConfigError) as refusal:
            read("cvt-31")
        assert str(refusal.value) == message


def test_every_key_maps_both_ways_and_nothing_is_left_over(original):
    reference, _ = original
    from cvt_fast.original import key_in_original, original_key

    model = CvtForImageClassification(config_from_spec(SMALL_SPEC, num_labels=10))
    ours = set(model.state_dict())
    theirs = set(reference.state_dict())
    assert {original_key(k) for k in theirs} == ours
    assert {key_in_original(k) for k in ours} == theirs


def edited(state, remove=(), add=None):
    return {**{k: v for k, v in state.items() if k not in remove}, **(add or {})}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: {"conv1.weight": s["head.weight"], "fc.bias": s["head.bias"]}, "not an original CvT checkpoint"),
        (lambda s: edited(s, add={"stage0.pos_embed": torch.zeros(1)}),
         "keys outside the original CvT's layout: stage0.pos_embed"),
        (lambda s: edited(s, remove=["stage2.blocks.2.mlp.fc2.bias"]),
         "lacks what the spec needs: stage2.blocks.2.mlp.fc2.bias"),
        (lambda s: edited(s, add={"stage2.blocks.3.norm1.weight": torch.ones(48)}),
         "the spec's DEPTH (1, 2, 3) does not match the checkpoint's (1, 2, 4); give the spec it was trained with"),
        (lambda s: edited(s, add={"stage2.blocks.2.attn.extra.weight": torch.ones(48)}),
         "keys outside the original CvT's layout: stage2.blocks.2.attn.extra.weight"),
        (lambda s: edited(s, add={"stage1.blocks.0.attn.proj_q.weight": torch.ones(16, 16)}),
         "stage1.blocks.0.attn.proj_q.weight is (16, 16), the spec makes it (32, 32)"),
        (lambda s: {k: v for k, v in s.items() if k.startswith(("norm.", "head."))},
         "lacks what the spec needs: every stage; it has only norm.weight, norm.bias, head.weight, head.bias"),
    ],
    ids=["another architecture", "an unknown key", "a missing key", "an extra layer", "an unknown key in a layer",
         "a wrong shape", "no stage"],
)  # fmt: skip
@pytest.mark.parametrize("model_class", [CvtForImageClassification, CvtModel])
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_key(original, tmp_path, damage, message, model_class):
    reference, _ = original
    state = damage({k: v.float() for k, v in reference.state_dict().items()})
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_class.from_original(tmp_path / "bad.pth", spec=SMALL_SPEC)


def test_a_transformers_checkpoint_or_another_spec_is_named_as_such(original, tmp_path):
    reference, _ = original
    cvt_fast_keys = CvtForImageClassification(config_from_spec(SMALL_SPEC)).state_dict()
    torch.save(cvt_fast_keys, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="already a transformers CvT checkpoint .*load its folder with "
                                              "from_pretrained, no conversion needed"):  # fmt: skip
        CvtForImageClassification.from_original(tmp_path / "pytorch_model.bin", spec=SMALL_SPEC)
    torch.save(reference.state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match=r"the spec's DIM_EMBED \(64, 192, 384\) does not match the "
                                              r"checkpoint's \(16, 32, 48\)"):  # fmt: skip
        CvtForImageClassification.from_original(
            tmp_path / "small.pth", spec={**SMALL_SPEC, "DIM_EMBED": [64, 192, 384]}
        )


@pytest.mark.parametrize(
    "spec, message",
    [
        ({**SMALL_SPEC, "DIM_EMBD": [1]}, "DIM_EMBD is not a field of the original CvT's spec"),
        ({k: v for k, v in SMALL_SPEC.items() if k != "DEPTH"}, "DEPTH is missing"),
        ({**SMALL_SPEC, "NUM_HEADS": [1, 2]}, "NUM_HEADS is list [1, 2], expected a list of one entry per stage"),
        ({**SMALL_SPEC, "POS_EMBED": [True, False, False]}, "POS_EMBED"),
        ({**SMALL_SPEC, "NUM_HEADS": [1, 3, 3]}, "stage 1: embed_dim 32 is not divisible by num_heads 3"),
    ],
    ids=["a misspelt field", "a missing field", "a short list", "position embeddings", "a field no CvT can have"],
)
def test_a_spec_that_is_wrong_is_refused_naming_the_field(original, spec, message):
    _, path = original
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CvtForImageClassification.from_original(path, spec=spec)


def test_an_unknown_activation_or_stochastic_depth_is_refused():
    with pytest.raises(ConfigError, match=r"hidden_act str 'relu' is not one of \('gelu', 'quick_gelu'\)"):
        cvt_fast.CvtConfig(hidden_act="relu")
    with pytest.raises(ConfigError, match="stochastic_depth str 'timm' is not one of"):
        cvt_fast.CvtConfig(stochastic_depth="timm")


def test_the_switch_is_written_only_when_set_and_saving_says_what_transformers_would_run(tmp_path, caplog):
    assert "hidden_act" not in cvt_fast.CvtConfig().to_dict()  # a default config.json is transformers' own
    config = cvt_fast.CvtConfig(depth=[1, 2], embed_dim=[16, 32], num_heads=[1, 2], hidden_act="quick_gelu",
                                stochastic_depth="original", drop_path_rate=[0.0, 0.1])  # fmt: skip
    assert cvt_fast.CvtConfig.from_dict(config.to_dict()) == config
    with caplog.at_level("WARNING", logger="cvt_fast"):
        CvtForImageClassification(config).save_pretrained(tmp_path / "saved")
    assert "transformers loads it but runs another model, silently: hidden_act 'quick_gelu'" in caplog.text
    assert "stochastic_depth 'original'" in caplog.text
