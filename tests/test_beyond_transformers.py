"""Where transformers crashes, cvt_fast works as the original CvT did. The oracles here are written out in the
test (float64), or transformers itself with the crash worked around."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import cvt_fast
from cvt_fast.modeling import CvtSelfAttention, layer_drop_path_rates
from cvt_fast.testing import randomize_

from helpers import model_pair, rel_err

transformers = pytest.importorskip("transformers")


def original_cvt_attention(module: CvtSelfAttention, x, height, width, method):
    """The original CvT's attention for the 'avg' / 'linear' projections, written out: queries are the tokens,
    keys and values average-pooled (ceil_mode, as the original) or the tokens too."""
    cls, tokens = (x[:, :1], x[:, 1:]) if module.with_cls_token else (None, x)
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    pool = module.convolution_projection_key.pooling if method == "avg" else None

    def project(t):
        if pool is None:
            return t
        pooled = F.avg_pool2d(grid, pool.kernel_size, pool.stride, pool.padding, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2)

    q, k, v = tokens, project(tokens), project(tokens)
    if cls is not None:
        q, k, v = (torch.cat((cls, t), 1) for t in (q, k, v))
    q, k, v = module.projection_query(q), module.projection_key(k), module.projection_value(v)
    heads = module.num_heads
    q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    probs = (q @ k.transpose(-1, -2) * channels**-0.5).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(batch, -1, channels)


@pytest.mark.parametrize("method", ["avg", "linear"])
@pytest.mark.parametrize("with_cls", [False, True])
@pytest.mark.parametrize("size", [(7, 5), (8, 8), (3, 11)])
def test_avg_and_linear_projections(method, with_cls, size):
    module = (
        CvtSelfAttention(
            num_heads=2,
            embed_dim=12,
            kernel_size=3,
            padding_q=1,
            padding_kv=1,
            stride_q=1,
            stride_kv=2,
            qkv_projection_method=method,
            qkv_bias=True,
            attention_drop_rate=0.0,
            with_cls_token=with_cls,
        )
        .double()
        .eval()
    )
    randomize_(module, torch.Generator().manual_seed(0))
    height, width = size
    x = torch.randn(2, int(with_cls) + height * width, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = original_cvt_attention(module, x, height, width, method)
        actual = module(x, height, width)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < 1e-12


def test_whole_model_with_avg_projection_runs_and_trains():
    config = cvt_fast.CvtConfig(
        depth=[1, 2], embed_dim=[16, 32], num_heads=[1, 2], qkv_projection_method=["avg", "dw_bn"], num_labels=3
    )
    model = cvt_fast.CvtForImageClassification(config).train()
    assert not any("convolution_projection_key.convolution" in k for k in model.state_dict() if "stages.0" in k)
    loss = model(torch.randn(2, 3, 45, 37), labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert torch.isfinite(loss) and model.classifier.weight.grad.abs().sum() > 0


def test_stage_whose_depth_is_not_above_its_index():
    kwargs = dict(depth=[2, 1, 1], embed_dim=[16, 24, 32], num_heads=[1, 2, 2], drop_path_rate=[0.1, 0.2, 0.3])
    config = cvt_fast.CvtConfig(**kwargs)
    assert layer_drop_path_rates(config, 0) == [0.0, 0.0]  # transformers' choice where it has one
    assert layer_drop_path_rates(config, 1) == [0.0]  # per layer (original CvT) where it has none
    assert layer_drop_path_rates(cvt_fast.CvtConfig(depth=[1, 2, 3], drop_path_rate=[0, 0, 0.3]), 2) == pytest.approx(
        [0.3, 0.3, 0.3]
    )

    # transformers fails building it (list index out of range); given enough rates, its eval forward is defined.
    real_linspace = torch.linspace
    longer = lambda start, end, steps, **kw: real_linspace(start, end, steps + 3, **kw)  # noqa: E731
    hf_class, hf_config = transformers.CvtForImageClassification, transformers.CvtConfig(**kwargs)
    with mock.patch.object(torch, "linspace", longer):
        hf = hf_class(hf_config)
    randomize_(hf, torch.Generator().manual_seed(0)).eval()
    ours = cvt_fast.CvtForImageClassification(config).eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        assert rel_err(ours(x).logits, hf(x).logits) < 2e-5


def test_cls_token_on_an_early_stage():
    # With equal widths transformers can run it (it sizes every cls token by embed_dim[-1]): compare.
    kwargs = dict(depth=[1, 2, 3], embed_dim=[24, 24, 24], num_heads=[1, 2, 3], cls_token=[True, False, True])
    hf, ours = model_pair(kwargs)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected, actual = hf(x, output_hidden_states=True), ours(x, output_hidden_states=True)
    assert rel_err(actual.logits, expected.logits) < 2e-5

    # With other widths transformers crashes; ours sizes each cls token by its own stage.
    model = cvt_fast.CvtModel(
        cvt_fast.CvtConfig(depth=[1, 2], embed_dim=[16, 32], num_heads=[1, 2], cls_token=[True, True])
    )
    assert model.encoder.stages[0].cls_token.shape == (1, 1, 16)
    out = model(torch.randn(2, 3, 40, 40))
    assert out.cls_token_value.shape == (2, 1, 32) and out.last_hidden_state.shape == (2, 32, 5, 5)
    out.cls_token_value.sum().backward()
    assert model.encoder.stages[0].cls_token.grad.abs().sum() > 0  # the stage-0 cls token takes part
