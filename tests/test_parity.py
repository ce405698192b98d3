"""The eager path against transformers: float32 on the CPU, every output within 2e-5 relative (also under small
BatchNorm variances, a different eps per projection and large attention scores); float16 and bfloat16 as close to
float64 as transformers in the same dtype (2x its error plus the dtype's floor)."""

import copy

import pytest
import torch

import cvt_fast

from support.helpers import FLOORS, harden_statistics_, model_pair, random_config_kwargs, random_image_size, rel_err

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

TOL = 2e-5
SEEDS = range(16)


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= TOL, f"{what}: relative error {err:.2e} > {TOL}"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_config_eval(seed):
    kwargs = random_config_kwargs(seed)
    hf, ours = model_pair(kwargs, seed=seed)
    height, width = random_image_size(kwargs, seed)
    batch = 1 + seed % 3
    x = torch.randn(batch, kwargs["num_channels"], height, width)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True)
        actual = ours(x, output_hidden_states=True)
    assert_close(actual.logits, expected.logits, "logits")
    assert len(actual.hidden_states) == len(expected.hidden_states)
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
        assert_close(a, e, f"hidden_states[{i}]")


def test_eval_mode_ignores_every_dropout_rate():
    """Dropout, attention dropout and stochastic depth at high rates change nothing in eval mode: the logits are
    transformers' and two forward passes are bitwise equal."""
    kwargs = random_config_kwargs(5, stages=2)
    kwargs.update(drop_rate=[0.3, 0.3], attention_drop_rate=[0.5, 0.5], drop_path_rate=[0.4, 0.4])
    hf, ours = model_pair(kwargs, seed=5)
    x = torch.randn(2, kwargs["num_channels"], *random_image_size(kwargs, 5))
    with torch.no_grad():
        expected, first, second = hf(x).logits, ours(x).logits, ours(x).logits
    assert_close(first, expected, "logits in eval mode with dropout rates set")
    assert torch.equal(first, second)


@pytest.mark.parametrize("seed", SEEDS)
def test_small_variances_distinct_eps_and_large_scores(seed):
    """Eval mode, where BatchNorm is folded into the depthwise convs, under statistics that make every term of the
    fold matter (see harden_statistics_): BatchNorm variances down to 1e-4 with a different eps for every
    projection (set on both models' modules: eps is not in the state dict), and attention scores up to ~50."""
    kwargs = random_config_kwargs(seed)
    hf, ours = harden_statistics_(model_pair(kwargs, seed=seed), torch.Generator().manual_seed(seed))
    x = torch.randn(1 + seed % 3, kwargs["num_channels"], *random_image_size(kwargs, seed))
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True)
        actual = ours(x, output_hidden_states=True)
    assert_close(actual.logits, expected.logits, "logits")
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
        assert_close(a, e, f"hidden_states[{i}]")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_eager_path_is_as_accurate_as_transformers(dtype):
    """The accuracy rule at model level for the eager path: cvt_fast in float16/bfloat16 is as close to float64 as
    transformers in the same dtype (2x its error, plus the dtype's floor)."""
    kwargs = random_config_kwargs(4, stages=2, embed_dim=[24, 48], num_heads=[1, 2], patch_stride=[4, 2])
    hf, ours = harden_statistics_(model_pair(kwargs, seed=4), torch.Generator().manual_seed(4))
    # A batch of 8: the rule compares maxima over every element, which steady with more of them (with 2 images,
    # the two libraries' errors, equal in the median, are at times 1.2x apart one way or the other in bfloat16).
    x = torch.randn(
        8, kwargs["num_channels"], *random_image_size(kwargs, 4), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        reference = copy.deepcopy(hf).double()(x.double(), output_hidden_states=True)
        theirs = hf.to(dtype)(x.to(dtype), output_hidden_states=True)
        actual = ours.to(dtype)(x.to(dtype), output_hidden_states=True)
    outputs = [("logits", reference.logits, actual.logits, theirs.logits)]
    hidden = zip(reference.hidden_states, actual.hidden_states, theirs.hidden_states, strict=True)
    outputs += [(f"hidden_states[{i}]", *triple) for i, triple in enumerate(hidden)]
    for name, ref, a, e in outputs:
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        ours_err, hf_err = rel_err(a, ref), rel_err(e, ref)
        assert ours_err <= 2 * hf_err + FLOORS[dtype], f"{name}: {ours_err:.2e} from float64, transformers {hf_err:.2e}"


@pytest.mark.parametrize("seed", SEEDS[:8])
def test_random_config_base_model(seed):
    kwargs = random_config_kwargs(seed, cls_token=None)
    kwargs["cls_token"] = [False] * (len(kwargs["depth"]) - 1) + [True]
    hf, ours = model_pair(kwargs, head=False, seed=seed)
    x = torch.randn(2, kwargs["num_channels"], *random_image_size(kwargs, seed))
    with torch.no_grad():
        expected, actual = hf(x), ours(x)
    assert_close(actual.last_hidden_state, expected.last_hidden_state, "last_hidden_state")
    assert_close(actual.cls_token_value, expected.cls_token_value, "cls_token_value")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cvt-13", "cvt-21", "cvt-w24"])
def test_presets_at_small_size(name):
    kwargs = cvt_fast.preset(name).config().to_dict()
    kwargs.pop("model_type")
    hf, ours = model_pair(kwargs)
    x = torch.randn(1, 3, 53, 70)  # odd, non-square, and not a multiple of the total stride
    with torch.no_grad():
        assert_close(ours(x).logits, hf(x).logits, f"{name} logits")


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("hidden", [True, False])
def test_tuple_form_matches_transformers(cls_token, hidden):
    kwargs = random_config_kwargs(3, stages=2, cls_token=[False, cls_token])
    hf, ours = model_pair(kwargs, head=False)
    x = torch.randn(2, kwargs["num_channels"], 40, 37)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=hidden, return_dict=False)
        actual = ours(x, output_hidden_states=hidden, return_dict=False)
    assert isinstance(actual, tuple) and len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if isinstance(e, tuple):
            for j, (aa, ee) in enumerate(zip(a, e, strict=True)):
                assert_close(aa, ee, f"tuple[{i}][{j}]")
        else:
            assert_close(a, e, f"tuple[{i}]")


def test_classifier_tuple_form_with_loss_and_hidden_states():
    kwargs = random_config_kwargs(5, num_labels=4)
    hf, ours = model_pair(kwargs)
    x = torch.randn(3, kwargs["num_channels"], *random_image_size(kwargs, 5))
    labels = torch.tensor([0, 3, 1])
    with torch.no_grad():
        expected = hf(x, labels=labels, output_hidden_states=True, return_dict=False)
        actual = ours(x, labels=labels, output_hidden_states=True, return_dict=False)
    if kwargs["cls_token"][
        -1
    ]:  # otherwise transformers drops the hidden states from its tuple (docs/kernels.md: quirks)
        assert len(actual) == len(expected) == 3
    assert_close(actual[0], expected[0], "loss")
    assert_close(actual[1], expected[1], "logits")
    dict_form = ours(x, labels=labels, output_hidden_states=True)
    assert dict_form[0] is not None and torch.equal(dict_form["logits"], dict_form.logits)
    assert list(dict_form.keys()) == ["loss", "logits", "hidden_states"]


@pytest.mark.parametrize(
    "num_labels, labels_fn, problem_type",
    [
        (1, lambda b, n: torch.randn(b), "regression"),
        (5, lambda b, n: torch.randint(0, n, (b,)), "single_label_classification"),
        (5, lambda b, n: torch.randint(0, 2, (b, n)).float(), "multi_label_classification"),
        (3, lambda b, n: torch.randn(b, n), "multi_label_classification"),  # float labels, num_labels > 1
        (4, lambda b, n: torch.randint(0, n, (b,), dtype=torch.int32), "single_label_classification"),
        (1, lambda b, n: torch.randn(b, 1), "regression"),  # labels shaped like the logits
    ],
)
def test_losses_chosen_and_computed_as_transformers(num_labels, labels_fn, problem_type):
    kwargs = random_config_kwargs(7, num_labels=num_labels)
    hf, ours = model_pair(kwargs)
    x = torch.randn(4, kwargs["num_channels"], *random_image_size(kwargs, 7))
    labels = labels_fn(4, num_labels)
    with torch.no_grad():
        actual = ours(x, labels=labels)
        # transformers picks single-label classification for int32 labels too, then crashes in cross_entropy (which
        # takes int64 class indices only); cvt_fast computes that loss. The oracle is transformers on int64 labels.
        expected = hf(x, labels=labels.long() if labels.dtype == torch.int32 else labels)
    assert ours.config.problem_type == hf.config.problem_type == problem_type
    assert_close(actual.loss, expected.loss, "loss")


@pytest.mark.parametrize("return_dict", [True, False])
def test_config_defaults_for_the_outputs(return_dict):
    """config.output_hidden_states and config.return_dict decide when forward is not told, as in transformers."""
    kwargs = random_config_kwargs(6, stages=2, cls_token=[False, True], output_hidden_states=True)
    kwargs["return_dict"] = return_dict
    hf, ours = model_pair(kwargs)
    x = torch.randn(2, kwargs["num_channels"], *random_image_size(kwargs, 6))
    with torch.no_grad():
        expected, actual = hf(x), ours(x)
    assert isinstance(actual, tuple) == (not return_dict) == isinstance(expected, tuple)
    expected_hidden = expected.hidden_states if return_dict else expected[1]
    actual_hidden = actual.hidden_states if return_dict else actual[1]
    assert len(actual_hidden) == len(expected_hidden) == 2
    for i, (a, e) in enumerate(zip(actual_hidden, expected_hidden, strict=True)):
        assert_close(a, e, f"hidden_states[{i}]")


def test_explicit_regression_with_several_outputs():
    kwargs = random_config_kwargs(8, num_labels=3, problem_type="regression")
    hf, ours = model_pair(kwargs)
    x = torch.randn(2, kwargs["num_channels"], *random_image_size(kwargs, 8))
    labels = torch.randn(2, 3)
    with torch.no_grad():
        assert_close(ours(x, labels=labels).loss, hf(x, labels=labels).loss, "loss")


def _train_step(model, x, labels):
    model.train()
    out = model(x, labels=labels, output_hidden_states=True)  # transformers crashes without hidden states when
    out.loss.backward()  # the last stage has no cls token; asking for them sidesteps that
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("seed", range(6))
def test_train_mode_float64_is_the_same_math(seed):
    """In float64 rounding vanishes, so outputs, loss, gradients and BatchNorm running statistics must agree to
    ~1e-10: any difference in the computation itself would show far above that. Each BatchNorm has its own eps, so
    one taken from elsewhere shows too."""
    kwargs = random_config_kwargs(seed, num_labels=3)
    pair = harden_statistics_(model_pair(kwargs, seed=seed), torch.Generator().manual_seed(seed))
    hf, ours = (m.double() for m in pair)
    x = torch.randn(3, kwargs["num_channels"], *random_image_size(kwargs, seed), dtype=torch.float64)
    labels = torch.tensor([2, 0, 1])
    expected, expected_grads = _train_step(hf, x, labels)
    actual, actual_grads = _train_step(ours, x, labels)
    assert rel_err(actual.logits, expected.logits) < 1e-10
    assert rel_err(actual.loss, expected.loss) < 1e-10
    largest = max(g.abs().max().item() for g in expected_grads.values())
    for name, grad in actual_grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert (grad - expected_grads[name]).abs().max() <= 1e-10 * largest, f"grad {name}"
    hf_buffers = dict(hf.named_buffers())
    for name, buffer in ours.named_buffers():  # BatchNorm running statistics move the same way
        assert torch.allclose(buffer, hf_buffers[name], rtol=1e-10, atol=0), f"buffer {name}"


@pytest.mark.parametrize("seed", range(6))
def test_train_mode_float32(seed):
    """Outputs and loss within 2e-5 of transformers. Gradients: float32 rounding alone moves transformers' own
    gradients up to ~8e-4 (relative) from float64 on these models (measured, seeds 0-7), so two float32
    implementations cannot agree to 2e-5; instead ours must be as close to float64 as transformers is (the
    accuracy rule: 2x its error plus the 1e-5 float32 floor), model-wide."""
    kwargs = random_config_kwargs(seed, num_labels=3)
    hf, ours = model_pair(kwargs, seed=seed)
    hf64 = copy.deepcopy(hf).double()
    x = torch.randn(3, kwargs["num_channels"], *random_image_size(kwargs, seed))
    labels = torch.tensor([2, 0, 1])
    expected, expected_grads = _train_step(hf, x, labels)
    actual, actual_grads = _train_step(ours, x, labels)
    _, grads64 = _train_step(hf64, x.double(), labels)
    assert_close(actual.logits, expected.logits, "train-mode logits")
    assert_close(actual.loss, expected.loss, "train-mode loss")
    largest = max(g.abs().max().item() for g in grads64.values())

    def model_wide_error(grads):
        return max((g.double() - grads64[n]).abs().max().item() for n, g in grads.items()) / largest

    assert all(g is not None for g in actual_grads.values())
    ours_err, hf_err = model_wide_error(actual_grads), model_wide_error(expected_grads)
    assert ours_err <= 2 * hf_err + 1e-5, f"gradients {ours_err:.2e} from float64; transformers' {hf_err:.2e}"


def test_train_mode_with_dropout_and_drop_path_draws_the_same_random_numbers():
    kwargs = random_config_kwargs(
        11, stages=2, drop_rate=[0.1, 0.2], attention_drop_rate=[0.1, 0.3], drop_path_rate=[0.0, 0.5], depth=[1, 3]
    )
    hf, ours = model_pair(kwargs)
    hf.train(), ours.train()
    x = torch.randn(4, kwargs["num_channels"], 64, 48)
    torch.manual_seed(99)
    expected = hf(x).logits
    torch.manual_seed(99)
    actual = ours(x).logits
    torch.manual_seed(100)
    different = ours(x).logits
    assert_close(actual, expected, "logits with dropout and drop path")
    assert rel_err(different, expected) > 1e-3, "another seed should give other dropout masks"


EDITS = [
    "no_grad in place",
    "through .data",
    "load_state_dict",
    "reassigned data x1",
    "reassigned data x2",
    "edited as float64",
    "eps",
    "training forward",
]


@pytest.mark.parametrize("edit", EDITS)
def test_eager_inference_honours_edited_weights(edit):
    """The eager path folds BatchNorm into the conv weights: every way of editing them must show in the next
    inference, including those no version counter sees: edits through .data (peft's merge writes that way), a new
    eps (a module attribute), and running statistics updated by a forward in training mode (a frozen backbone
    fine-tuned in train mode, then evaluated)."""
    kwargs = random_config_kwargs(2, stages=2, cls_token=[False, True])
    hf, ours = harden_statistics_(model_pair(kwargs), torch.Generator().manual_seed(2))
    x = torch.randn(1, kwargs["num_channels"], *random_image_size(kwargs, 2))
    with torch.inference_mode():
        ours(x)  # whatever a forward may keep
    bn = ours.cvt.encoder.stages[-1].layers[0].attention.attention.convolution_projection_key.convolution_projection
    if edit == "no_grad in place":
        with torch.no_grad():
            bn.normalization.running_var.mul_(3.0)
            bn.convolution.weight.add_(0.5)
    elif edit == "through .data":
        bn.normalization.running_var.data.mul_(3.0)
        bn.convolution.weight.data.add_(0.5)
    elif edit == "load_state_dict":
        state = {k: v.clone() for k, v in bn.state_dict().items()}
        state["normalization.running_mean"] += 1.0
        bn.load_state_dict(state)
    elif edit.startswith("reassigned data"):
        for _ in range(int(edit[-1])):  # new storage each time, which the allocator may place where an old one was
            bn.normalization.weight.data = bn.normalization.weight.data * 2.0
    elif edit == "eps":
        bn.normalization.eps = 10 * bn.normalization.eps
    elif edit == "training forward":
        for parameter in ours.parameters():
            parameter.requires_grad_(False)
        ours.train()
        ours(3.0 * x + 1.0)  # every BatchNorm updates its running statistics, in place
        ours.eval()
    else:
        ours.double()
        with torch.no_grad():
            bn.normalization.bias.add_(1.0)
        ours.float()
    hf.load_state_dict(ours.state_dict())
    for name, module in ours.named_modules():  # eps is not in the state dict
        if isinstance(module, torch.nn.BatchNorm2d):
            hf.get_submodule(name).eps = module.eps
    with torch.inference_mode():
        assert_close(ours(x).logits, hf(x).logits, f"logits after {edit}")


def test_dtype_changes_are_followed():
    kwargs = random_config_kwargs(3, stages=2)
    hf, ours = model_pair(kwargs)
    x = torch.randn(2, kwargs["num_channels"], *random_image_size(kwargs, 3))
    with torch.inference_mode():
        ours(x)
    ours.double()
    with torch.inference_mode():
        assert_close(ours(x.double()).logits, hf.double()(x.double()).logits, "logits after .double()")


def test_a_model_loaded_and_moved_under_inference_mode_stays_ordinary(tmp_path):
    """Serving code often loads inside torch.inference_mode; tensors made there could never be trained.
    from_pretrained and .to() make theirs outside it."""
    kwargs = random_config_kwargs(4, stages=2, qkv_projection_method=["dw_bn", "dw_bn"])
    hf, ours = model_pair(kwargs)
    ours.save_pretrained(tmp_path)
    x = torch.randn(2, kwargs["num_channels"], *random_image_size(kwargs, 4))
    with torch.inference_mode():
        loaded = cvt_fast.CvtForImageClassification.from_pretrained(tmp_path).double()
        logits = loaded(x.double()).logits
    assert not [name for name, t in loaded.state_dict().items() if t.is_inference()]
    assert_close(logits, hf.double()(x.double()).logits, "logits of the model loaded under inference_mode")
    with torch.inference_mode():  # a copy made here is of inference tensors, which .to() must leave consistent
        copied = copy.deepcopy(loaded).float()
        assert_close(copied(x).logits, hf.float()(x).logits, "logits of a copy made and moved under inference_mode")
