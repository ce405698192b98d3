"""CvtConfig: transformers' parameters, config.json both ways, presets, clear errors."""

import json

import pytest

from cvt_fast import PRESETS, CvtConfig, preset

transformers = pytest.importorskip("transformers")


def test_defaults_match_transformers():
    ours = CvtConfig().to_dict()
    theirs = json.loads(json.dumps(transformers.CvtConfig().to_dict()))  # as config.json holds it
    for key, value in ours.items():
        if key in theirs:
            assert theirs[key] == value, key
    assert CvtConfig().num_labels == transformers.CvtConfig().num_labels == 2


def test_reads_a_transformers_config_json(tmp_path):
    theirs = transformers.CvtConfig(
        depth=[1, 4, 16], id2label={0: "cat", 1: "dog", 2: "bird"}, problem_type="single_label_classification"
    )
    theirs.save_pretrained(tmp_path)
    ours = CvtConfig.from_pretrained(tmp_path)
    assert ours.depth == [1, 4, 16]
    assert ours.id2label == {0: "cat", 1: "dog", 2: "bird"} and ours.label2id == {"cat": 0, "dog": 1, "bird": 2}
    assert ours.num_labels == 3 and ours.problem_type == "single_label_classification"
    assert ours.extra["transformers_version"] == transformers.__version__  # keys without a meaning here survive


def test_written_config_json_is_read_by_transformers(tmp_path):
    ours = CvtConfig(embed_dim=[32, 64, 96], num_heads=[1, 2, 3], num_labels=4, cls_token=[False, True, True])
    ours.save_pretrained(tmp_path)
    theirs = transformers.CvtConfig.from_pretrained(tmp_path)
    assert theirs.embed_dim == [32, 64, 96] and theirs.num_labels == 4 and theirs.cls_token == [False, True, True]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "cvt"
    assert CvtConfig.from_pretrained(tmp_path) == ours


def test_num_labels_setter_regenerates_labels():
    config = CvtConfig()
    config.num_labels = 5
    assert config.id2label == {i: f"LABEL_{i}" for i in range(5)} and config.label2id["LABEL_4"] == 4


@pytest.mark.parametrize(
    "name, depth, embed_dim, size",
    [
        ("cvt-13", [1, 2, 10], [64, 192, 384], 224),
        ("cvt-13-384", [1, 2, 10], [64, 192, 384], 384),
        ("cvt-21", [1, 4, 16], [64, 192, 384], 224),
        ("cvt-21-384", [1, 4, 16], [64, 192, 384], 384),
        ("cvt-w24", [2, 2, 20], [192, 768, 1024], 224),
        ("cvt-w24-384", [2, 2, 20], [192, 768, 1024], 384),
    ],
)
def test_presets(name, depth, embed_dim, size):
    p = preset(name)
    config = p.config()
    assert (config.depth, config.embed_dim, p.image_size, config.num_labels) == (depth, embed_dim, size, 1000)
    assert CvtConfig.from_pretrained(name) == config
    assert name in PRESETS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(embed_dim=[64, 192, 385]), "not divisible by num_heads"),
        (dict(depth=[1, 2, 3], embed_dim=[8, 8]), "embed_dim has 2"),
        (dict(qkv_projection_method=["dw_bn", "conv", "dw_bn"]), "'conv' is not one of"),
        (dict(problem_type="ranking"), "problem_type 'ranking'"),
        (dict(stride_q=[1, 2, 1]), "query projection must keep the token grid"),
        (dict(depth=[1, 0, 1]), "depth must be at least 1"),
        (dict(num_labels=3, id2label={0: "a", 1: "b"}), "num_labels=3 disagrees with id2label"),
    ],
)
def test_invalid_configs_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CvtConfig(**kwargs)


def test_longer_stage_lists_are_accepted_as_transformers_does():
    config = CvtConfig(depth=[1, 2], embed_dim=[16, 32], num_heads=[1, 2])  # other lists keep 3 default entries
    assert config.num_stages == 2


def test_unknown_preset_and_wrong_model_type():
    with pytest.raises(KeyError, match="unknown preset"):
        preset("cvt-99")
    with pytest.raises(ValueError, match="model_type 'vit'"):
        CvtConfig.from_dict({"model_type": "vit"})


def test_overrides_replace_what_the_file_says(tmp_path):
    transformers.CvtConfig(id2label={i: f"class {i}" for i in range(1000)}).save_pretrained(tmp_path)
    config = CvtConfig.from_pretrained(tmp_path, num_labels=10, depth=[1, 4, 16])
    assert config.num_labels == 10 and config.id2label[9] == "LABEL_9" and config.depth == [1, 4, 16]
    assert config.num_labels == transformers.CvtConfig.from_pretrained(tmp_path, num_labels=10).num_labels
