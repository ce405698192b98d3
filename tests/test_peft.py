"""LoRA through peft itself, as users fine-tune: adapters on the attention and MLP linears, a few SGD steps in
training mode (which also moves every BatchNorm's running statistics, in place), then merged into the weights.
peft merges through `.data`, which no version counter sees: the inference paths (oneDNN on the CPU, the kernels'
BatchNorm fold) must serve the merged weights, and the merged model must load in cvt_fast and in transformers with
the same logits."""

import pytest
import torch

import cvt_fast

from support.helpers import TRAINABLE, harden_statistics_, model_pair, rel_err

pytestmark = pytest.mark.ecosystem

peft = pytest.importorskip("peft")

CONFIG = dict(TRAINABLE, num_labels=4)
TARGETS = ["projection_query", "projection_value", "dense"]  # q and v, attention output, both MLP linears


def backends():
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["auto"]
    return ["auto", "triton"]  # triton: the kernels (in Triton's interpreter without a GPU)


def lora_trained(model, x, labels, steps=3):
    """A peft LoRA model trained a few SGD steps from `model` (which it wraps, and modifies, in place)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    peft_model = peft.get_peft_model(model, config)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    for _ in range(steps):
        peft_model(pixel_values=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval()


def copy_eps(source, target):
    """Each BatchNorm's eps (harden_statistics_ gives each its own) is in no state dict: carry it over by name."""
    for name, module in source.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            target.get_submodule(name).eps = module.eps
    return target


def logits(model, x):
    with torch.inference_mode():
        return model(pixel_values=x).logits


@pytest.mark.parametrize("backend", backends())
def test_lora_merge_and_unload_serves_the_merged_weights(backend, tmp_path):
    import transformers

    _, ours = harden_statistics_(model_pair(CONFIG), torch.Generator().manual_seed(0))
    ours.set_backend(backend)
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    before = logits(ours, x)  # an inference before fine-tuning: whatever it might keep must not outlive the edits
    peft_model = lora_trained(ours, x, labels)
    unmerged = logits(peft_model, x)
    assert rel_err(unmerged, before) > 1e-2, "the adapters and the BatchNorm updates should move the logits"

    merged = peft_model.merge_and_unload()
    assert type(merged) is cvt_fast.CvtForImageClassification
    assert rel_err(logits(merged, x), unmerged) < 2e-5
    if backend == "triton":
        assert {p["qkv_projection"] for p in merged.kernel_paths().values()} == {"triton"}

    merged.save_pretrained(tmp_path)
    theirs = copy_eps(merged, transformers.CvtForImageClassification.from_pretrained(tmp_path).eval())
    mine = copy_eps(merged, cvt_fast.CvtForImageClassification.from_pretrained(tmp_path, backend=backend).eval())
    assert rel_err(logits(theirs, x), unmerged) < 2e-5
    assert rel_err(logits(mine, x), unmerged) < 2e-5


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unmerge_in_place_are_followed(safe_merge):
    """merge_adapter() writes W + BA into the base weights (through .data, or a new tensor with safe_merge) and
    unmerge_adapter() takes it out again; every state in between serves its own weights."""
    _, ours = harden_statistics_(model_pair(CONFIG), torch.Generator().manual_seed(1))
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    peft_model = lora_trained(ours, x, labels)
    unmerged = logits(peft_model, x)
    with peft_model.disable_adapter():
        without = logits(peft_model, x)
    assert rel_err(without, unmerged) > 1e-2
    peft_model.merge_adapter(safe_merge=safe_merge)  # from here the base layers alone run, on W + BA
    assert rel_err(logits(peft_model, x), unmerged) < 2e-5
    peft_model.unmerge_adapter()  # W again, plus the adapters' branch
    with peft_model.disable_adapter():
        assert rel_err(logits(peft_model, x), without) < 2e-5
    assert rel_err(logits(peft_model, x), unmerged) < 2e-5


def test_lora_on_a_patched_transformers_model():
    """A transformers model patched by cvt_fast, fine-tuned with LoRA and merged: the same logits as the same
    merged weights in an unpatched transformers model."""
    import transformers

    hf, _ = harden_statistics_(model_pair(CONFIG), torch.Generator().manual_seed(2))
    reference = transformers.CvtForImageClassification(hf.config).eval()
    cvt_fast.patch(hf)
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    logits(hf, x)
    merged = lora_trained(hf, x, labels).merge_and_unload()
    reference.load_state_dict(merged.state_dict())
    assert rel_err(logits(merged, x), logits(copy_eps(merged, reference), x)) < 2e-5
