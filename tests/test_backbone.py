"""CvtBackbone: the chosen stages' feature maps at any image size, equal to CvtModel's and to transformers' hidden
states; out_features / out_indices as transformers' backbones take them; classifier checkpoints load; stages after
the last one asked for do not run; torch.compile across sizes without a recompile; gradient checkpointing that
changes nothing but memory."""

import copy

import pytest
import torch

import cvt_fast
from cvt_fast import ConfigError, CvtBackbone, CvtConfig
from cvt_fast.testing import randomize_

from support.helpers import fused_ops, model_pair, rel_err

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

# head_dim 32 in every stage, the smallest the attention kernel takes
SMALL = dict(depth=[1, 2, 3], embed_dim=[32, 64, 96], num_heads=[1, 2, 3], cls_token=[False, False, True], num_labels=5)


def backbone_and_model(out_features=None, out_indices=None, backend="eager", seed=0):
    torch.manual_seed(seed)
    model = randomize_(cvt_fast.CvtModel(CvtConfig(**SMALL), backend=backend), torch.Generator().manual_seed(seed))
    config = CvtConfig(**SMALL, out_features=out_features, out_indices=out_indices)
    backbone = CvtBackbone(config, backend=backend)
    backbone.load_state_dict(model.state_dict())
    return backbone.eval(), model.eval()


@pytest.mark.parametrize("size", [(97, 131), (255, 33), (16, 16), (320, 288)])
@pytest.mark.parametrize("out_features", [None, ["stage1", "stage2", "stage3"], ["stage2"]])
def test_feature_maps_are_cvt_models_hidden_states(size, out_features):
    backbone, model = backbone_and_model(out_features)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        maps = backbone(x).feature_maps
        hidden = model(x, output_hidden_states=True).hidden_states
    indices = [int(name[-1]) - 1 for name in out_features or ["stage3"]]
    assert len(maps) == len(indices)
    for feature_map, index in zip(maps, indices, strict=True):
        assert torch.equal(feature_map, hidden[index])


@pytest.mark.parametrize("size", [(97, 131), (161, 49)])
def test_feature_maps_and_cls_token_match_transformers(size):
    hf, ours = model_pair(SMALL, head=False)
    backbone = CvtBackbone(CvtConfig(**SMALL, out_indices=[0, 1, 2])).eval()
    backbone.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True)
        output = backbone(x, output_cls_tokens=True)
    for actual, reference in zip(output.feature_maps, expected.hidden_states, strict=True):
        assert actual.shape == reference.shape
        assert rel_err(actual, reference) < 2e-5
    assert output.cls_tokens[:2] == (None, None)
    assert rel_err(output.cls_tokens[2], expected.cls_token_value) < 2e-5


@pytest.mark.parametrize("stages", [[1, 2, 3], [2, 3], [1, 3], [3]], ids=str)
def test_channels_and_reductions_describe_the_maps(stages):
    config = cvt_fast.preset("cvt-13").config()
    config.update(out_features=[f"stage{s}" for s in stages])
    backbone = CvtBackbone(config).eval()
    assert backbone.stage_names == ["stage1", "stage2", "stage3"]
    # CvT-13 (the paper's Table 2): 64, 192, 384 channels at strides 4, 8, 16
    assert backbone.channels == [{1: 64, 2: 192, 3: 384}[s] for s in stages]
    assert backbone.reductions == [{1: 4, 2: 8, 3: 16}[s] for s in stages]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 224, 224)).feature_maps
    for feature_map, channels, stride in zip(maps, backbone.channels, backbone.reductions, strict=True):
        assert feature_map.shape == (1, channels, 224 // stride, 224 // stride)


def test_out_features_and_out_indices_align_and_default_to_the_last_stage():
    assert CvtConfig(**SMALL).backbone_stages() == (["stage3"], [2])
    assert CvtConfig(**SMALL, out_indices=[-2, -1]).backbone_stages() == (["stage2", "stage3"], [1, 2])
    assert CvtConfig(**SMALL, out_features=["stage1", "stage3"]).backbone_stages() == (["stage1", "stage3"], [0, 2])
    config = CvtConfig(**SMALL, out_indices=[0])
    config.update(out_features=["stage2"])  # setting one re-aligns the other, as in transformers
    assert config.backbone_stages() == (["stage2"], [1])


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(out_features=["stem"]), r"\['stem'\] are not stages; the stages are \['stage1', 'stage2', 'stage3'\]"),
        (dict(out_features=["stage2", "stage1"]), "must follow the stages' order"),
        (dict(out_features=["stage1", "stage1"]), "must not contain duplicates"),
        (dict(out_features="stage1"), "out_features must be a non-empty list of stage names, got str"),
        (dict(out_features=[]), "out_features must be a non-empty list"),
        (dict(out_indices=[3]), "each must index one of the 3 stages"),
        (dict(out_indices=[-4]), "each must index one of the 3 stages"),
        (dict(out_indices=[2, 0]), "must follow the stages' order"),
        (dict(out_indices=[0, -3]), "must not contain duplicates"),
        (dict(out_indices=[1.0]), "out_indices must be a non-empty list of stage indices"),
        (dict(out_features=["stage1"], out_indices=[1]), "name different stages"),
    ],
)
def test_bad_out_features_and_out_indices_are_refused_with_the_field_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        CvtConfig(**SMALL, **fields)


def test_loads_classifier_and_backbone_checkpoints(tmp_path):
    torch.manual_seed(0)
    classifier = randomize_(cvt_fast.CvtForImageClassification(CvtConfig(**SMALL))).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    classifier.cvt.save_pretrained(tmp_path / "model")
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = classifier.cvt(x, output_hidden_states=True).hidden_states
    for checkpoint in ("classifier", "model"):
        backbone = CvtBackbone.from_pretrained(tmp_path / checkpoint, out_features=["stage1", "stage3"]).eval()
        assert set(backbone.state_dict()) == set(classifier.cvt.state_dict())  # the head is left out
        with torch.no_grad():
            maps = backbone(x).feature_maps
        assert torch.equal(maps[0], expected[0]) and torch.equal(maps[1], expected[2])
    # and transformers reads the backbone's config.json, out_features and all
    backbone.save_pretrained(tmp_path / "backbone")
    hf_config = transformers.CvtConfig.from_pretrained(tmp_path / "backbone")
    assert hf_config.out_features == ["stage1", "stage3"] and hf_config.out_indices == [0, 2]


def test_stages_after_the_last_requested_do_not_run():
    backbone, _ = backbone_and_model(out_features=["stage1"])
    calls = []
    backbone.encoder.stages[2].register_forward_hook(lambda *args: calls.append("stage3"))
    with torch.no_grad():
        output = backbone(torch.randn(1, 3, 48, 48))
        assert calls == [] and len(output.feature_maps) == 1
        output = backbone(torch.randn(1, 3, 48, 48), output_hidden_states=True)  # all stages, then
    assert calls == ["stage3"] and len(output.hidden_states) == 3


@pytest.mark.slow
def test_tuple_form_and_the_kernel_backend():
    backbone, _ = backbone_and_model(out_indices=[1, 2])
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        maps = backbone(x).feature_maps
        as_tuple = backbone(x, return_dict=False)
        assert len(as_tuple) == 1 and all(torch.equal(a, b) for a, b in zip(as_tuple[0], maps, strict=True))
        if cvt_fast.kernels.launch.TRITON_INTERPRET:  # the kernels in Triton's interpreter (CPU CI)
            backbone.set_backend("triton")
            kernel_maps = backbone(x).feature_maps
            assert {p for layer in backbone.kernel_paths().values() for p in fused_ops(layer).values()} == {"triton"}
            for a, b in zip(kernel_maps, maps, strict=True):
                assert rel_err(a, b) < 2e-5


@pytest.mark.slow
def test_torch_compile_follows_changing_sizes_without_recompiling():
    """(torch specialises sizes 0 and 1, and its CPU convolution picks a memory layout by size: an image whose last
    k/v grid is one row high, or one on the other side of such a threshold, compiles once more.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    config = CvtConfig(depth=[1, 1], embed_dim=[32, 64], num_heads=[1, 2], cls_token=[False, True], out_indices=[0, 1])
    backbone = randomize_(CvtBackbone(config, backend="eager")).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(backbone, backend=counter, dynamic=True)
    frames = None
    with torch.no_grad():
        for size in [(112, 128), (97, 131), (161, 99)]:
            x = torch.randn(1, 3, *size)
            for a, b in zip(compiled(x).feature_maps, backbone(x).feature_maps, strict=True):
                assert rel_err(a, b) < 1e-6
            frames = counter.frame_count if frames is None else frames
            assert counter.frame_count == frames, f"recompiled for {size}"


@pytest.mark.gpu
def test_torch_compile_with_the_kernels_follows_changing_sizes_on_gpu():
    from torch._dynamo.testing import CompileCounterWithBackend

    backbone, _ = backbone_and_model(out_indices=[0, 1, 2], backend="triton")
    backbone = backbone.cuda()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(backbone, backend=counter, dynamic=True)
    frames = None
    with torch.no_grad():
        for size in [(224, 224), (320, 256), (97, 131), (512, 384)]:
            x = torch.randn(1, 3, *size, device="cuda")
            for a, b in zip(compiled(x).feature_maps, backbone(x).feature_maps, strict=True):
                assert rel_err(a, b) < 1e-4
            frames = counter.frame_count if frames is None else frames
            assert counter.frame_count == frames, f"recompiled for {size}"


# ---- gradient checkpointing ---------------------------------------------------------------------------------


def training_step(model, x, labels, seed):
    torch.manual_seed(seed)  # dropout and stochastic depth draw the same numbers in both runs
    loss = model(x, labels=labels).loss
    loss.backward()
    return loss


def test_gradient_checkpointing_changes_nothing_but_memory():
    small = dict(depth=[1, 2], embed_dim=[16, 32], num_heads=[1, 2], cls_token=[False, True], num_labels=5)
    config = CvtConfig(**small, drop_rate=[0.1] * 2, drop_path_rate=[0.1, 0.2], attention_drop_rate=[0.1] * 2)
    torch.manual_seed(0)
    plain = randomize_(cvt_fast.CvtForImageClassification(config)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    x, labels = torch.randn(3, 3, 40, 32), torch.tensor([0, 4, 2])
    for step in range(2):  # BatchNorm statistics evolve: each batch must be counted once
        a = training_step(plain, x, labels, seed=step)
        b = training_step(checkpointed, x, labels, seed=step)
        assert torch.equal(a, b)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for (name, buffer), other in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(buffer, other), name  # running statistics and num_batches_tracked
    checkpointed.gradient_checkpointing_disable()
    assert not checkpointed.is_gradient_checkpointing


@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [False, True])
def test_gradient_checkpointing_under_torch_compile(fullgraph):
    """Compiled, the recomputation is AOTAutograd's: the same step as eager without checkpointing, BatchNorm
    statistics counted once (float64 and no dropout, so that the two can be held to equality)."""
    small = dict(depth=[1, 2], embed_dim=[16, 32], num_heads=[1, 2], cls_token=[False, True], num_labels=5)
    torch.manual_seed(0)
    plain = randomize_(cvt_fast.CvtForImageClassification(CvtConfig(**small, drop_path_rate=[0.0, 0.0])))
    plain = plain.double().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    compiled = torch.compile(checkpointed, backend="aot_eager", fullgraph=fullgraph)
    x, labels = torch.randn(3, 3, 40, 32, dtype=torch.float64), torch.tensor([0, 4, 2])
    for step in range(2):
        assert torch.equal(training_step(plain, x, labels, step), training_step(compiled, x, labels, step))
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
    for (name, buffer), other in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(other, buffer, rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("every_n_layers, offload", [(2, False), (1, True), (3, True)])
def test_checkpointing_every_nth_layer_and_offloaded_changes_nothing_but_memory(every_n_layers, offload, monkeypatch):
    """What transformers' Trainer asks for (activation_checkpointing_enable with every_n_layers and offload): the
    layers with index 0, n, 2n, ... across stages are recomputed, the rest run as usual, and the step is the same."""
    from cvt_fast import checkpointing

    small = dict(depth=[1, 3], embed_dim=[16, 32], num_heads=[1, 2], cls_token=[False, True], num_labels=5)
    torch.manual_seed(0)
    plain = randomize_(cvt_fast.CvtForImageClassification(CvtConfig(**small, drop_path_rate=[0.0, 0.0])))
    plain = plain.double().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(None, every_n_layers=every_n_layers, offload=offload)
    assert checkpointed.is_activation_checkpointing
    recomputed = []
    real = checkpointing.checkpointed_call
    monkeypatch.setattr(
        checkpointing, "checkpointed_call", lambda layer, *a, **k: recomputed.append(layer) or real(layer, *a, **k)
    )
    x, labels = torch.randn(3, 3, 40, 32, dtype=torch.float64), torch.tensor([0, 4, 2])
    assert torch.equal(training_step(plain, x, labels, 0), training_step(checkpointed, x, labels, 0))
    layers = [layer for stage in checkpointed.cvt.encoder.stages for layer in stage.layers]
    assert recomputed == layers[::every_n_layers]
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="every_n_layers must be a whole number of at least 1, got 0"):
        checkpointed.activation_checkpointing_enable(every_n_layers=0)


def test_gradient_checkpointing_refuses_reentrant_recomputation():
    model = cvt_fast.CvtModel(CvtConfig(**SMALL))
    with pytest.raises(ValueError, match="use_reentrant=True is not supported"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert model.is_gradient_checkpointing


@pytest.mark.slow
def test_the_custom_ops_trace_with_symbolic_shapes():
    """torch.compile(dynamic=True) through torch.ops.cvt_fast.*: their fake implementations compute the output
    shapes from symbolic sizes, so a new grid size reuses the graph (on the CPU the ops run the eager reference;
    on a GPU, the kernels). Checked against the definition, conv then BatchNorm then softmax attention."""
    import torch.nn.functional as F
    from torch._dynamo.testing import CompileCounterWithBackend

    channels, heads, eps, generator = 64, 2, [1e-5, 1e-3, 1e-4], torch.Generator().manual_seed(0)
    weights = [torch.randn(channels, 1, 3, 3, generator=generator) for _ in range(3)]
    norms = [
        [torch.randn(channels, generator=generator) for _ in range(3)] + [torch.rand(channels, generator=generator)]
        for _ in range(3)
    ]  # fmt: skip  (gamma, beta, mean, var) per projection
    conv = (weights, [t for norm in norms for t in norm], eps, 1, 1, 2, 1)

    def layer(x, height, width):
        q, k, v = torch.ops.cvt_fast.qkv_projection(x, height, width, True, *conv)
        return torch.ops.cvt_fast.attention(q, k, v, heads, channels**-0.5)

    def definition(x, height, width):
        x = x.double()
        grid = x[:, 1:].transpose(1, 2).reshape(x.shape[0], channels, height, width)
        projected = []
        for weight, (gamma, beta, mean, var), e, stride in zip(weights, norms, eps, (1, 2, 2), strict=True):
            y = F.conv2d(grid, weight.double(), None, stride, 1, groups=channels)
            y = F.batch_norm(y, mean.double(), var.double(), gamma.double(), beta.double(), False, 0.0, e)
            projected.append(torch.cat((x[:, :1], y.flatten(2).transpose(1, 2)), 1))
        q, k, v = (t.unflatten(2, (heads, -1)).transpose(1, 2) for t in projected)
        out = torch.softmax(q @ k.transpose(-1, -2) * channels**-0.5, -1) @ v
        return out.transpose(1, 2).flatten(2)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, dynamic=True, fullgraph=True)
    frames = None
    for height, width in [(6, 7), (9, 5), (12, 12), (7, 10)]:
        x = torch.randn(2, 1 + height * width, channels)
        assert rel_err(compiled(x, height, width), definition(x, height, width)) < 1e-5
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled for a {height}x{width} grid"
