"""CvtConfig: transformers' parameters, config.json both ways, presets, clear errors."""

import inspect
import json

import numpy as np
import pytest

from cvt_fast import PRESETS, ConfigError, CvtConfig, preset

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")


# Arguments of transformers' CvtConfig that belong to its PreTrainedConfig machinery, not to the model: cvt_fast keeps
# them (when a config.json has them) as unread extra keys.
TRANSFORMERS_ONLY = {"transformers_version", "architectures", "dtype", "chunk_size_feed_forward", "is_encoder_decoder"}


def test_defaults_match_transformers():
    ours = CvtConfig().to_dict()
    theirs = json.loads(json.dumps(transformers.CvtConfig().to_dict()))  # as config.json holds it
    for key, value in ours.items():
        if key in theirs:
            assert theirs[key] == value, key
    # Every argument transformers' CvtConfig takes, as an attribute: the same default (lists and tuples alike).
    theirs, ours = transformers.CvtConfig(), CvtConfig()
    arguments = set(inspect.signature(transformers.CvtConfig.__init__).parameters) - {"self", "kwargs"}
    for name in sorted(arguments - TRANSFORMERS_ONLY):
        expected = getattr(theirs, name)
        actual = getattr(ours, name)
        if isinstance(expected, (list, tuple)):
            expected, actual = list(expected), list(actual)
        assert actual == expected, f"{name}: {actual!r}, transformers {expected!r}"
    assert ours.num_labels == theirs.num_labels == 2


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


def test_a_folder_named_like_a_preset_is_the_users(tmp_path, monkeypatch):
    """A checkpoint downloaded or saved as ./cvt-13-384 is read from disk, config and preprocessing alike."""
    from cvt_fast.image_processing import CvtImageProcessor

    monkeypatch.chdir(tmp_path)
    assert CvtImageProcessor.from_pretrained("cvt-13-384").size == 384  # no such folder yet: the preset
    mine = CvtConfig(depth=[1, 1], embed_dim=[16, 32], num_heads=[1, 2], num_labels=3)
    mine.save_pretrained("cvt-13-384")
    CvtImageProcessor(size=96, crop_pct=1.0).save_pretrained("cvt-13-384")
    assert CvtConfig.from_pretrained("cvt-13-384") == mine
    processor = CvtImageProcessor.from_pretrained("cvt-13-384")
    assert (processor.size, processor.crop_pct) == (96, 1.0)


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


# ---- every field checked, and named --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_channels=0), "num_channels must be at least 1, got 0"),
        (dict(num_channels=True), "num_channels must be an integer, got bool True"),
        (dict(depth=3), "depth must be a list with one entry per stage, got int 3"),
        (dict(depth="123"), "depth must be a list with one entry per stage, got str '123'"),
        (dict(depth=[1, 2.0, 3]), "stage 1: depth must be an integer, got float 2.0"),
        (dict(patch_sizes=[7, 0, 3]), "stage 1: patch_sizes must be at least 1, got 0"),
        (dict(patch_stride=[4, 2, -2]), "stage 2: patch_stride must be at least 1, got -2"),
        (dict(patch_padding=[-1, 1, 1]), "stage 0: patch_padding must be at least 0, got -1"),
        (dict(embed_dim=[64, None, 384]), "stage 1: embed_dim must be an integer, got NoneType None"),
        (dict(num_heads=[0, 3, 6]), "stage 0: num_heads must be at least 1, got 0"),
        (dict(kernel_qkv=[3, "3", 3]), "stage 1: kernel_qkv must be an integer, got str '3'"),
        (dict(padding_kv=[1, 1, -1]), "stage 2: padding_kv must be at least 0, got -1"),
        (dict(stride_kv=[2, 0, 2]), "stage 1: stride_kv must be at least 1, got 0"),
        (dict(padding_q=[1, 1, 1.5]), "stage 2: padding_q must be an integer, got float 1.5"),
        (dict(stride_q=[1, 1, 0]), "stage 2: stride_q must be at least 1, got 0"),
        (dict(mlp_ratio=[4.0, -4.0, 4.0]), "stage 1: mlp_ratio must be at least 0, got -4.0"),
        (dict(mlp_ratio=[4.0, 4.0, "4"]), "stage 2: mlp_ratio must be a number, got str '4'"),
        (dict(mlp_ratio=[float("nan"), 4.0, 4.0]), "stage 0: mlp_ratio must be a finite number, got nan"),
        (dict(drop_rate=[0.0, 1.5, 0.0]), "stage 1: drop_rate must be at most 1, got 1.5"),
        (dict(drop_rate=[-0.1, 0.0, 0.0]), "stage 0: drop_rate must be at least 0, got -0.1"),
        (dict(attention_drop_rate=[0.0, 0.0, float("inf")]), "stage 2: attention_drop_rate must be a finite number"),
        (dict(drop_path_rate=[0.0, 0.0, 1.0]), "stage 2: drop_path_rate must be below 1, got 1.0"),
        (dict(qkv_bias=[True, 1, True]), "stage 1: qkv_bias must be true or false, got int 1"),
        (dict(cls_token=[False, False, "yes"]), "stage 2: cls_token must be true or false, got str 'yes'"),
        (
            dict(qkv_projection_method=["dw_bn", None, "dw_bn"]),
            "stage 1: qkv_projection_method NoneType None is not one of",
        ),
        (
            dict(qkv_projection_method=["avg"] * 3, padding_kv=[1, 2, 1]),
            "stage 1: padding_kv 2 is more than half of kernel_qkv 3, which average pooling",
        ),
        (dict(initializer_range=0.0), "initializer_range must be above 0, got 0.0"),
        (dict(initializer_range="0.02"), "initializer_range must be a number, got str '0.02'"),
        (dict(layer_norm_eps=None), "layer_norm_eps must be a number, got NoneType None"),
        (dict(num_labels=-1), "num_labels must be at least 0, got -1"),
        (dict(num_labels="10"), "num_labels must be an integer, got str '10'"),
        (dict(id2label=["cat", "dog"]), "id2label must be a dict of class indices to label names, got list"),
        (dict(id2label={"zero": "cat"}), "id2label keys must be class indices \\(integers\\), got str 'zero'"),
        (dict(id2label={0: ["cat"]}), "id2label\\[0\\] must be a label name \\(a string\\), got list"),
        (dict(label2id=["cat"]), "label2id must be a dict of label names to indices, got list"),
        (dict(output_hidden_states="no"), "output_hidden_states must be true or false, got str 'no'"),
        (dict(return_dict=None), "return_dict must be true or false, got NoneType None"),
    ],
)
def test_each_field_is_checked_and_named(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        CvtConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(drop_rate=[1.0, 1.0, 1.0], attention_drop_rate=[1.0, 0.0, 0.5]),  # torch's Dropout takes p = 1
        dict(mlp_ratio=[0.0, 0.01, 4]),  # no hidden units, or an int ratio: transformers builds and runs these
        dict(depth=(1, 2, 3), embed_dim=(8, 16, 24), num_heads=(1, 2, 3)),  # tuples, as transformers' defaults
        dict(depth=[np.int64(1), 2, 3], mlp_ratio=[np.float32(2.0), 4.0, 4.0]),  # numpy scalars from a script
        dict(layer_norm_eps=-1.0),  # never read by the model, in transformers either
        dict(output_hidden_states=1, return_dict=0),  # transformers takes 0 and 1 for these
        dict(qkv_projection_method=["linear"] * 3, kernel_qkv=[1, 1, 1], padding_q=[5, 5, 5]),  # unused by "linear"
        dict(depth=[1, 2], embed_dim=[8, 24, 0]),  # entries past the last stage are never read (transformers too)
    ],
)
def test_what_transformers_accepts_is_accepted(kwargs):
    assert CvtConfig(**kwargs).num_stages == len(kwargs.get("depth", [1, 2, 10]))


def test_a_refused_update_leaves_the_config_as_it_was():
    config = CvtConfig(depth=[1, 2, 3])
    before = config.to_dict()
    with pytest.raises(ConfigError, match="stage 2: depth must be at least 1, got 0"):
        config.update(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 1, 0])
    with pytest.raises(ConfigError, match="num_labels must be at least 0"):
        config.update(num_labels=-3)
    assert config.to_dict() == before


def test_update_normalises_what_config_json_spells_differently():
    config = CvtConfig()
    config.update(depth=(1, 1, 1), id2label={"0": "cat", "1": "dog"})
    assert config.depth == [1, 1, 1] and config.id2label == {0: "cat", 1: "dog"}


def test_a_config_json_key_named_self_is_kept_like_any_unknown_key():
    assert CvtConfig.from_dict({"self": 1, "depth": [1, 2, 3]}).extra == {"self": 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is not valid JSON \\(Expecting value at line 1 column 1\\)"),
        ('{"depth": [1, 2, 3]', "is not valid JSON \\(Expecting ',' delimiter at line 1 column 20\\)"),
        ("[1, 2, 3]", "expected a JSON object \\(\\{\\.\\.\\.\\}\\), got list"),
        ('{"model_type": "vit"}', "this is a config for model_type 'vit', not a CvT"),
        ('{"depth": [1, 0, 1]}', "stage 1: depth must be at least 1, got 0"),
        ("[" * 100_000, "is JSON nested too deeply"),
    ],
    ids=["empty", "cut short", "a list", "another model", "a bad value", "deep nesting"],
)
def test_config_files_are_named_in_refusals(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        CvtConfig.from_pretrained(path)
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        CvtConfig.from_pretrained(tmp_path)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"depth": "\xff\xfe"}')
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'config.json'}: is not UTF-8 text"):
        CvtConfig.from_pretrained(tmp_path)


def test_overrides_of_a_file_are_not_blamed_on_the_file(tmp_path):
    CvtConfig().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="^stage 0: depth must be at least 1, got 0$"):
        CvtConfig.from_pretrained(tmp_path, depth=[0, 1, 1])


def test_a_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path} has no config.json$"):
        CvtConfig.from_pretrained(tmp_path)
