"""Where transformers crashes, cvt_fast works as the original CvT did. The oracles here are written out in the
test from the definition (float64), or transformers itself with the crash worked around; hyperparameters come from
the config the model was built from, never from the module under test."""

import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import cvt_fast
from cvt_fast.modeling import CvtSelfAttention, layer_drop_path_rates
from cvt_fast.testing import randomize_

from support.helpers import model_pair, rel_err

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")


def original_cvt_project(grid, method, kernel, stride, padding):
    """(B, C, H, W) -> (B, H'*W', C): the original CvT's key/value projection for 'avg' (nn.AvgPool2d with
    ceil_mode=True, padding counted, as the original builds it) or 'linear' (the tokens themselves)."""
    if method == "avg":
        grid = F.avg_pool2d(grid, kernel, stride, padding, ceil_mode=True, count_include_pad=True)
    return grid.flatten(2).transpose(1, 2)


def original_cvt_attention(linears, num_heads, with_cls, x, height, width, method, kernel, stride_kv, padding_kv):
    """The original CvT's attention for the 'avg' / 'linear' projections, written out: queries are the tokens
    (the original maps 'avg' to 'linear' for q), keys and values projected as above, softmax(q k^T / sqrt(C)) v
    per head with C the full width (transformers' and the original's scale)."""
    query_linear, key_linear, value_linear = linears
    cls, tokens = (x[:, :1], x[:, 1:]) if with_cls else (None, x)
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    q = tokens
    k = v = original_cvt_project(grid, method, kernel, stride_kv, padding_kv)
    if cls is not None:
        q, k, v = (torch.cat((cls, t), 1) for t in (q, k, v))
    q, k, v = query_linear(q), key_linear(k), value_linear(v)
    q, k, v = (t.reshape(batch, t.shape[1], num_heads, -1).transpose(1, 2) for t in (q, k, v))
    probs = (q @ k.transpose(-1, -2) * channels**-0.5).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(batch, -1, channels)


# (method, kernel, stride_kv, padding_kv): pooling windows that overhang the grid (ceil_mode), with and without
# padding; "linear" ignores them.
PROJECTIONS = [("avg", 3, 2, 1), ("avg", 2, 2, 0), ("avg", 3, 1, 1), ("avg", 5, 3, 2), ("linear", 3, 2, 1)]


@pytest.mark.parametrize("method, kernel, stride_kv, padding_kv", PROJECTIONS)
@pytest.mark.parametrize("with_cls", [False, True])
@pytest.mark.parametrize("size", [(7, 5), (8, 8), (3, 11)])
def test_avg_and_linear_projections(method, kernel, stride_kv, padding_kv, with_cls, size):
    heads, channels = 2, 12
    module = (
        CvtSelfAttention(
            num_heads=heads,
            embed_dim=channels,
            kernel_size=kernel,
            padding_q=kernel // 2,
            padding_kv=padding_kv,
            stride_q=1,
            stride_kv=stride_kv,
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
    x = torch.randn(2, int(with_cls) + height * width, channels, dtype=torch.float64)
    linears = (module.projection_query, module.projection_key, module.projection_value)
    with torch.no_grad():
        expected = original_cvt_attention(
            linears, heads, with_cls, x, height, width, method, kernel, stride_kv, padding_kv
        )
        actual = module(x, height, width)
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < 1e-12


def transformers_with_original_projections(kwargs, seed=0):
    """transformers' model (which builds 'avg'/'linear' layers but cannot run them) with each such attention layer's
    forward replaced by the original CvT's, written out above from the config; everything else is transformers'."""
    config = transformers.CvtConfig(**kwargs)
    hf = randomize_(transformers.CvtForImageClassification(config), torch.Generator().manual_seed(seed))
    for s, stage in enumerate(hf.cvt.encoder.stages):
        method = config.qkv_projection_method[s]
        if method == "dw_bn":
            continue
        for layer in stage.layers:
            attention = layer.attention.attention

            def forward(self, x, height, width, s=s, method=method):
                linears = (self.projection_query, self.projection_key, self.projection_value)
                return original_cvt_attention(
                    linears, self.num_heads, self.with_cls_token, x, height, width, method,
                    config.kernel_qkv[s], config.stride_kv[s], config.padding_kv[s],
                )  # fmt: skip

            attention.forward = types.MethodType(forward, attention)
    return hf


# An "avg" stage, a "dw_bn" stage between (transformers' own), a "linear" stage with the cls token; pooling
# parameters that differ from stage to stage.
AVG_MODEL = dict(
    depth=[1, 2, 3], embed_dim=[16, 24, 30], num_heads=[1, 2, 3], qkv_projection_method=["avg", "dw_bn", "linear"],
    patch_sizes=[5, 3, 3], patch_stride=[3, 2, 1], patch_padding=[1, 1, 1], kernel_qkv=[2, 3, 3],
    padding_q=[1, 1, 1], padding_kv=[1, 0, 1], stride_kv=[2, 2, 1], cls_token=[False, False, True], num_labels=3,
)  # fmt: skip


def test_whole_model_with_avg_and_linear_projections_against_the_original():
    hf = transformers_with_original_projections(AVG_MODEL).double()
    ours = cvt_fast.CvtForImageClassification(cvt_fast.CvtConfig(**AVG_MODEL)).double()
    ours.load_state_dict(hf.state_dict())  # strict: the same keys, none for the pooled or identity projections
    assert [
        s
        for s in range(3)
        if any(f"stages.{s}.layers.0.attention.attention.convolution_p" in k for k in ours.state_dict())
    ] == [1]
    x = torch.randn(2, 3, 47, 37, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    with torch.no_grad():  # eval
        hf.eval(), ours.eval()
        assert rel_err(ours(x).logits, hf(x).logits) < 1e-12
    hf.train(), ours.train()  # a training step (drop path on the last stage, by default): the same math
    torch.manual_seed(7)
    expected = hf(x, labels=labels)
    torch.manual_seed(7)
    actual = ours(x, labels=labels)
    expected.loss.backward()
    actual.loss.backward()
    assert rel_err(actual.loss, expected.loss) < 1e-12
    hf_params = dict(hf.named_parameters())
    largest = max(p.grad.abs().max().item() for p in hf_params.values())
    for name, param in ours.named_parameters():
        assert (param.grad - hf_params[name].grad).abs().max() <= 1e-10 * largest, name


def test_stage_whose_depth_is_not_above_its_index():
    kwargs = dict(depth=[2, 1, 2], embed_dim=[16, 24, 32], num_heads=[1, 2, 2], drop_path_rate=[0.1, 0.2, 0.3])
    config = cvt_fast.CvtConfig(**kwargs)
    # Rates from the definition, linspace(0, rate, depth): transformers gives every layer of stage s the s-th entry
    # where there is one, the original CvT gives each layer its own entry.
    assert layer_drop_path_rates(config, 0) == [0.0, 0.0]
    assert layer_drop_path_rates(config, 1) == [0.0]
    assert layer_drop_path_rates(config, 2) == pytest.approx([0.0, 0.3])
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
    # ... and the model uses those rates, layer by layer (stage 0: transformers' choice, the rest: per layer)
    rates = [
        [getattr(layer.drop_path, "drop_prob", 0.0) for layer in stage.layers] for stage in ours.cvt.encoder.stages
    ]
    assert rates == [[0.0, 0.0], [0.0], [0.0, pytest.approx(0.3)]]
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

    # With other widths transformers' cls token of stage 0 has the wrong size; given one of the right size (a
    # parameter swap, nothing in its computation changes), it runs, and is the oracle.
    kwargs = dict(depth=[1, 2], embed_dim=[16, 32], num_heads=[1, 2], cls_token=[True, True])
    ours = cvt_fast.CvtModel(cvt_fast.CvtConfig(**kwargs))
    assert ours.encoder.stages[0].cls_token.shape == (1, 1, 16)
    hf = transformers.CvtModel(transformers.CvtConfig(**kwargs))
    hf.encoder.stages[0].cls_token = torch.nn.Parameter(torch.zeros(1, 1, 16))
    randomize_(hf, torch.Generator().manual_seed(3)).double().eval()
    ours.load_state_dict(hf.state_dict())
    ours.double().eval()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = hf(x), ours(x)
    assert actual.cls_token_value.shape == (2, 1, 32) and actual.last_hidden_state.shape == (2, 32, 5, 5)
    assert rel_err(actual.cls_token_value, expected.cls_token_value) < 1e-12
    assert rel_err(actual.last_hidden_state, expected.last_hidden_state) < 1e-12
