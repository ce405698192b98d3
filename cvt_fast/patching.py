"""Drop-in for a transformers CvT the user already holds.

patch(model)             in place: every transformers CvtSelfAttention inside `model` (a CvtModel, a
                         CvtForImageClassification, or anything that contains one) is replaced by cvt_fast's, which
                         holds the *same* parameter and buffer tensors and the same hooks. The rest of the model,
                         its class, its state-dict keys and save_pretrained stay transformers'. unpatch(model) puts
                         the originals back with the fast layers' current tensors, so training, .to() and dtype
                         changes made meanwhile are kept.
from_transformers(model) a cvt_fast CvtModel / CvtForImageClassification with the model's config and the same
                         parameter tensors.
Both carry over what no state dict holds: each norm's eps and each BatchNorm's momentum.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CvtConfig
from .errors import InputError, InputTypeError
from .modeling import CvtForImageClassification, CvtModel, CvtSelfAttention
from .ops.dispatch import prepare_backend, resolve_backend

_ORIGINALS = "_cvt_fast_originals"  # attribute of a patched model: {qualified name: original module}


def _is_transformers_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "CvtSelfAttention" and cls.__module__.startswith("transformers.")


def _fast_attention_like(original: nn.Module, backend: str) -> CvtSelfAttention:
    """A cvt_fast attention layer with the original's hyperparameters, sharing its tensors."""
    query, key = original.convolution_projection_query, original.convolution_projection_key
    if not hasattr(key, "convolution_projection"):  # transformers builds "avg"/"linear" layers but cannot run them
        raise InputError(
            "this transformers CvT has a qkv_projection_method other than 'dw_bn', which transformers cannot run; "
            "build it with cvt_fast.from_transformers(model) or cvt_fast.CvtModel instead"
        )
    conv_q, conv_k = query.convolution_projection.convolution, key.convolution_projection.convolution
    with torch.device("meta"):  # parameters come from the original below; nothing to initialise
        fast = CvtSelfAttention(
            num_heads=original.num_heads,
            embed_dim=original.embed_dim,
            kernel_size=conv_k.kernel_size[0],
            padding_q=conv_q.padding[0],
            padding_kv=conv_k.padding[0],
            stride_q=conv_q.stride[0],
            stride_kv=conv_k.stride[0],
            qkv_projection_method="dw_bn",
            qkv_bias=original.projection_query.bias is not None,
            attention_drop_rate=original.dropout.p,
            with_cls_token=original.with_cls_token,
            backend=backend,
        )
    fast.load_state_dict(original.state_dict(keep_vars=True), strict=True, assign=True)
    _copy_norm_settings(original, fast)
    _share_hooks(original, fast)
    return fast.train(original.training)


def _copy_norm_settings(source: nn.Module, target: nn.Module) -> None:
    """eps (and BatchNorm's momentum) are module attributes, in no state dict: give each of `target`'s norms those of
    the module of the same name in `source`, so that it normalises (and tracks statistics) as the original did."""
    source_modules = dict(source.named_modules())
    for name, module in target.named_modules():
        original = source_modules.get(name)
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) and isinstance(original, type(module)):
            module.eps = original.eps
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = original.momentum


# The per-module hook registries of torch.nn.Module: shared (the same dicts), so a hook registered on either layer,
# before or after the swap, runs on whichever is in the model.
_HOOK_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _share_hooks(source: nn.Module, target: nn.Module) -> None:
    for registry in _HOOK_REGISTRIES:
        if hasattr(source, registry):
            setattr(target, registry, getattr(source, registry))


def patch(model: nn.Module, backend: str | None = None, inplace: bool = True) -> nn.Module:
    """Make a transformers CvT fast. In place by default (returns the same object); inplace=False returns a new
    cvt_fast model sharing the weights (see from_transformers) and leaves `model` untouched."""
    if not inplace:
        return from_transformers(model, backend)
    backend = resolve_backend(backend)
    prepare_backend(backend)
    originals = getattr(model, _ORIGINALS, {})
    targets = [(name, m) for name, m in model.named_modules() if _is_transformers_attention(m)]
    if not targets and not originals:
        raise InputTypeError(f"{type(model).__name__} contains no transformers CvtSelfAttention layer to patch")
    for name, original in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _fast_attention_like(original, backend))
        originals[name] = original
    for module in model.modules():  # a second patch() only changes the backend
        if isinstance(module, CvtSelfAttention):
            module.backend = backend
    setattr(model, _ORIGINALS, originals)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(model): the original transformers layers go back, with whatever the shared weights now hold."""
    originals = getattr(model, _ORIGINALS, None)
    if not originals:
        raise InputError(f"this {type(model).__name__} was not patched by cvt_fast.patch")
    for name, original in originals.items():
        parent_name, _, child = name.rpartition(".")
        fast = model.get_submodule(name)
        # .to(), .half() and training may have replaced tensors (buffers are never converted in place): the
        # original takes the fast layer's current ones.
        original.load_state_dict(fast.state_dict(keep_vars=True), strict=True, assign=True)
        _copy_norm_settings(fast, original)
        setattr(model.get_submodule(parent_name), child, original.train(fast.training))
    delattr(model, _ORIGINALS)
    return model


def from_transformers(model: nn.Module, backend: str | None = None) -> CvtModel | CvtForImageClassification:
    """A cvt_fast model equal to a transformers CvtModel or CvtForImageClassification: same config, same parameter
    and buffer tensors (shared, not copied), same train/eval mode."""
    kind = type(model).__name__
    if kind not in ("CvtModel", "CvtForImageClassification") or not type(model).__module__.startswith("transformers."):
        raise InputTypeError(f"expected a transformers CvtModel or CvtForImageClassification, got {kind}")
    # What the transformers model runs, whatever its config says of the original CvT's numerics (it ignores them).
    config = CvtConfig.from_dict(model.config.to_dict(), hidden_act="gelu", stochastic_depth="transformers")
    fast_class = CvtForImageClassification if kind == "CvtForImageClassification" else CvtModel
    with torch.device("meta"):
        fast = fast_class(config, backend=backend)
    fast.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
    _copy_norm_settings(model, fast)
    return fast.train(model.training)
