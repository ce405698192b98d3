"""CvT in PyTorch, module for module and name for name as transformers' modeling_cvt, so checkpoints load by key.

Activations stay in token layout (B, [1 +] H*W, C) between modules; a stage converts to (B, C, H, W) only at
its output, as a view. Each attention layer's q/k/v projection and attention go through cvt_fast.ops, along routes
the layer builds once (with its backend) that pick the Triton kernel or the eager reference; nothing in this file
looks at devices or dtypes.

Quirks kept for parity with transformers (docs/kernels.md): attention scale embed_dim ** -0.5, LayerNorm eps 1e-5
everywhere (config.layer_norm_eps is ignored), and by default exact GELU, stochastic depth applied to the MLP output
*after* its residual add, and one drop-path rate for a whole stage (the stage-index-th of its linspace). The
config's hidden_act="quick_gelu" and stochastic_depth="original" give the original CvT's instead (microsoft/CvT:
QuickGELU; each layer its own rate, on the attention and MLP branches only).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from . import ops
from .checkpointing import CheckpointedLayers, GradientCheckpointingMixin
from .checks import check_labels, check_pixel_values
from .config import CvtConfig
from .ops.dispatch import KernelPaths, prepare_backend, resolve_backend
from .outputs import BaseModelOutputWithCLSToken, ImageClassifierOutputWithNoAttention

# ---- linear layers ------------------------------------------------------------------------------------------


class CvtLinear(nn.Linear):
    """nn.Linear (same parameters, same keys; peft and other tools take it for one) whose CPU inference runs on
    oneDNN (cvt_fast.ops.linear); everywhere else it is F.linear. `route.taken` says which ran last."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.route = ops.LinearRoute()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.route)


# ---- embeddings ---------------------------------------------------------------------------------------------


class CvtConvEmbeddings(nn.Module):
    def __init__(self, patch_size: int, num_channels: int, embed_dim: int, stride: int, padding: int):
        super().__init__()
        self.projection = nn.Conv2d(num_channels, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.normalization = nn.LayerNorm(embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        grid = self.projection(pixel_values)  # (B, C, H, W)
        height, width = grid.shape[-2:]
        return self.normalization(ops.grid_to_tokens(grid)), height, width  # (B, H*W, C)


class CvtEmbeddings(nn.Module):
    def __init__(self, patch_size: int, num_channels: int, embed_dim: int, stride: int, padding: int, dropout_rate):
        super().__init__()
        self.convolution_embeddings = CvtConvEmbeddings(patch_size, num_channels, embed_dim, stride, padding)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        tokens, height, width = self.convolution_embeddings(pixel_values)
        return self.dropout(tokens), height, width


# ---- attention ----------------------------------------------------------------------------------------------


class CvtSelfAttentionConvProjection(nn.Module):
    def __init__(self, embed_dim: int, kernel_size: int, padding: int, stride: int):
        super().__init__()
        self.convolution = nn.Conv2d(
            embed_dim, embed_dim, kernel_size, padding=padding, stride=stride, bias=False, groups=embed_dim
        )
        self.normalization = nn.BatchNorm2d(embed_dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(grid))

    def bn_params(self) -> tuple[torch.Tensor, ...]:
        bn = self.normalization
        return bn.weight, bn.bias, bn.running_mean, bn.running_var


class CvtSelfAttentionProjection(nn.Module):
    """One of the q/k/v projections: "dw_bn" (depthwise conv + BatchNorm), "avg" (average pooling, as in the
    original CvT; transformers crashes on it) or "linear" (identity)."""

    def __init__(self, embed_dim: int, kernel_size: int, padding: int, stride: int, projection_method: str = "dw_bn"):
        super().__init__()
        self.projection_method = projection_method
        if projection_method == "dw_bn":
            self.convolution_projection = CvtSelfAttentionConvProjection(embed_dim, kernel_size, padding, stride)
        elif projection_method == "avg":
            self.pooling = nn.AvgPool2d(kernel_size, stride=stride, padding=padding, ceil_mode=True)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H'*W', C)
        if self.projection_method == "dw_bn":
            grid = self.convolution_projection(grid)
        elif self.projection_method == "avg":
            grid = self.pooling(grid)
        return ops.grid_to_tokens(grid)


class CvtSelfAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        embed_dim: int,
        kernel_size: int,
        padding_q: int,
        padding_kv: int,
        stride_q: int,
        stride_kv: int,
        qkv_projection_method: str,
        qkv_bias: bool,
        attention_drop_rate: float,
        with_cls_token: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.scale = embed_dim**-0.5  # transformers' (and the original CvT's) choice, not head_dim ** -0.5
        self.with_cls_token = with_cls_token
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.qkv_projection_method = qkv_projection_method
        self._strides = (stride_q, padding_q, stride_kv, padding_kv)  # keys and values share theirs

        query_method = "linear" if qkv_projection_method == "avg" else qkv_projection_method
        self.convolution_projection_query = CvtSelfAttentionProjection(
            embed_dim, kernel_size, padding_q, stride_q, query_method
        )
        self.convolution_projection_key = CvtSelfAttentionProjection(
            embed_dim, kernel_size, padding_kv, stride_kv, qkv_projection_method
        )
        self.convolution_projection_value = CvtSelfAttentionProjection(
            embed_dim, kernel_size, padding_kv, stride_kv, qkv_projection_method
        )
        self.projection_query = CvtLinear(embed_dim, embed_dim, bias=qkv_bias)
        self.projection_key = CvtLinear(embed_dim, embed_dim, bias=qkv_bias)
        self.projection_value = CvtLinear(embed_dim, embed_dim, bias=qkv_bias)
        self.dropout = nn.Dropout(attention_drop_rate)
        self.backend = backend  # builds the routes

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        """Each fused op's route (kernel or eager) is decided here, once, not on every forward."""
        self._backend = backend
        self.qkv_route = ops.qkv_projection_route(backend, self.qkv_projection_method)
        self.attention_route = ops.attention_route(backend, self.embed_dim, self.num_heads)

    def _projections(self) -> tuple[CvtSelfAttentionProjection, ...]:
        return (self.convolution_projection_query, self.convolution_projection_key, self.convolution_projection_value)

    def _project_with_modules(self, hidden_state: torch.Tensor, height: int, width: int):
        """q, k, v through the projection modules one by one (training, and the "avg"/"linear" methods)."""
        cls, tokens = ops.split_cls(hidden_state, self.with_cls_token)
        grid = ops.tokens_to_grid(tokens, height, width)  # (B, C, H, W)
        projected = [projection(grid) for projection in self._projections()]
        if cls is None:
            return tuple(projected)
        return tuple(torch.cat((cls, p), dim=1) for p in projected)

    def _qkv_operands(self) -> ops.QkvOperands | None:
        """The fused projection's arguments, gathered on every call: .to(), load_state_dict(assign=True) and peft
        replace these tensors, so a list kept from an earlier call could hold stale ones."""
        if self.qkv_projection_method != "dw_bn":
            return None
        convs = [p.convolution_projection for p in self._projections()]
        return ops.QkvOperands(
            [c.convolution.weight for c in convs],
            [t for c in convs for t in c.bn_params()],
            [c.normalization.eps for c in convs],
            *self._strides,
        )

    def forward(self, hidden_state: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # hidden_state (B, [1 +] H*W, C) -> context (B, [1 +] Hq*Wq, C)
        operands = None if self.training else self._qkv_operands()  # training projects with the modules
        qkv = ops.qkv_projection(hidden_state, height, width, self.with_cls_token, operands, self.qkv_route,
                                 self.training)  # fmt: skip
        if qkv is None:  # training (BatchNorm on batch statistics), or a projection the op does not fuse
            qkv = self._project_with_modules(hidden_state, height, width)
        query = self.projection_query(qkv[0])
        key = self.projection_key(qkv[1])
        value = self.projection_value(qkv[2])
        return ops.attention(
            query, key, value, self.num_heads, self.scale, self.attention_route, self.training, self.dropout.p
        )


class CvtSelfOutput(nn.Module):
    def __init__(self, embed_dim: int, drop_rate: float):
        super().__init__()
        self.dense = CvtLinear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_state))


class CvtAttention(nn.Module):
    def __init__(self, embed_dim: int, drop_rate: float, **self_attention_kwargs):
        super().__init__()
        self.attention = CvtSelfAttention(embed_dim=embed_dim, **self_attention_kwargs)
        self.output = CvtSelfOutput(embed_dim, drop_rate)

    def forward(self, hidden_state: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.output(self.attention(hidden_state, height, width))


# ---- MLP and layer ------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the original CvT's activation (config.hidden_act "quick_gelu")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CvtIntermediate(nn.Module):
    def __init__(self, embed_dim: int, mlp_ratio: float, hidden_act: str = "gelu"):
        super().__init__()
        self.dense = CvtLinear(embed_dim, int(embed_dim * mlp_ratio))
        self.activation = QuickGELU() if hidden_act == "quick_gelu" else nn.GELU()  # exact GELU, as transformers

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_state))


class CvtOutput(nn.Module):
    def __init__(self, embed_dim: int, mlp_ratio: float, drop_rate: float):
        super().__init__()
        self.dense = CvtLinear(int(embed_dim * mlp_ratio), embed_dim)
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, hidden_state: torch.Tensor, input_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's output plus its residual input; without one, the branch alone."""
        branch = self.dropout(self.dense(hidden_state))
        return branch if input_tensor is None else branch + input_tensor


class CvtDropPath(nn.Module):
    """Stochastic depth per sample; draws its random numbers exactly as transformers does."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        random_tensor = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        return hidden_states.div(keep_prob) * torch.floor(random_tensor + keep_prob)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class CvtLayer(nn.Module):
    def __init__(
        self, embed_dim: int, mlp_ratio: float, drop_rate: float, drop_path_rate: float, hidden_act: str = "gelu",
        stochastic_depth: str = "transformers", **attention_kwargs,
    ):  # fmt: skip
        super().__init__()
        self.attention = CvtAttention(embed_dim=embed_dim, drop_rate=drop_rate, **attention_kwargs)
        self.intermediate = CvtIntermediate(embed_dim, mlp_ratio, hidden_act)
        self.output = CvtOutput(embed_dim, mlp_ratio, drop_rate)
        self.drop_path = CvtDropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.layernorm_before = nn.LayerNorm(embed_dim)
        self.layernorm_after = nn.LayerNorm(embed_dim)
        self.drops_branches = stochastic_depth == "original"

    def forward(self, hidden_state: torch.Tensor, height: int, width: int) -> torch.Tensor:
        attention_output = self.attention(self.layernorm_before(hidden_state), height, width)
        hidden_state = self.drop_path(attention_output) + hidden_state
        mlp_input = self.intermediate(self.layernorm_after(hidden_state))
        if self.drops_branches:  # the original CvT: only the MLP's branch is dropped
            return hidden_state + self.drop_path(self.output(mlp_input))
        return self.drop_path(self.output(mlp_input, hidden_state))  # transformers drops the residual sum


# ---- stages, encoder ----------------------------------------------------------------------------------------


def layer_drop_path_rates(config: CvtConfig, stage: int) -> list[float]:
    """The original CvT gives layer j of a stage the j-th entry of linspace(0, rate, depth). transformers (the
    default, config.stochastic_depth "transformers") gives every layer of stage s the s-th entry; where that entry
    does not exist (depth <= s, on which transformers crashes), each layer takes its own, as in the original."""
    depth = config.depth[stage]
    rates = [x.item() for x in torch.linspace(0, config.drop_path_rate[stage], depth, device="cpu")]
    if config.stochastic_depth == "original" or stage >= depth:
        return rates
    return [rates[stage]] * depth


class CvtStage(CheckpointedLayers):
    def __init__(self, config: CvtConfig, stage: int, backend: str = "auto"):
        super().__init__()
        self.stage = stage
        embed_dim = config.embed_dim[stage]
        if config.cls_token[stage]:
            # (transformers sizes this by embed_dim[-1], which breaks a cls token on any stage but the last.)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.register_parameter("cls_token", None)
        self.embedding = CvtEmbeddings(
            patch_size=config.patch_sizes[stage],
            num_channels=config.num_channels if stage == 0 else config.embed_dim[stage - 1],
            embed_dim=embed_dim,
            stride=config.patch_stride[stage],
            padding=config.patch_padding[stage],
            dropout_rate=config.drop_rate[stage],
        )
        self.layers = nn.Sequential(
            *[
                CvtLayer(
                    embed_dim=embed_dim,
                    mlp_ratio=config.mlp_ratio[stage],
                    drop_rate=config.drop_rate[stage],
                    drop_path_rate=rate,
                    hidden_act=config.hidden_act,
                    stochastic_depth=config.stochastic_depth,
                    num_heads=config.num_heads[stage],
                    kernel_size=config.kernel_qkv[stage],
                    padding_q=config.padding_q[stage],
                    padding_kv=config.padding_kv[stage],
                    stride_q=config.stride_q[stage],
                    stride_kv=config.stride_kv[stage],
                    qkv_projection_method=config.qkv_projection_method[stage],
                    qkv_bias=config.qkv_bias[stage],
                    attention_drop_rate=config.attention_drop_rate[stage],
                    with_cls_token=config.cls_token[stage],
                    backend=backend,
                )
                for rate in layer_drop_path_rates(config, stage)
            ]
        )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_state, height, width = self.embedding(pixel_values)  # (B, H*W, C)
        if self.cls_token is not None:
            cls = self.cls_token.expand(hidden_state.shape[0], -1, -1)
            hidden_state = torch.cat((cls, hidden_state), dim=1)  # (B, 1 + H*W, C)
        hidden_state = self.run_layers(self.layers, hidden_state, height, width)
        cls_token, tokens = ops.split_cls(hidden_state, self.cls_token is not None)
        return ops.tokens_to_grid(tokens, height, width), cls_token  # (B, C, H, W) view, (B, 1, C) or None


class CvtEncoder(nn.Module):
    def __init__(self, config: CvtConfig, backend: str = "auto"):
        super().__init__()
        self.stages = nn.ModuleList(CvtStage(config, stage, backend) for stage in range(config.num_stages))
        first = 0
        for stage in self.stages:  # layers are counted across stages (gradient checkpointing's every_n_layers)
            stage.first_layer, first = first, first + len(stage.layers)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutputWithCLSToken:
        all_hidden_states = () if output_hidden_states else None
        hidden_state, cls_token = pixel_values, None
        for stage in self.stages:
            hidden_state, cls_token = stage(hidden_state)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_state,)
        return BaseModelOutputWithCLSToken(
            last_hidden_state=hidden_state, cls_token_value=cls_token, hidden_states=all_hidden_states
        )


# ---- models -------------------------------------------------------------------------------------------------


def kernel_paths(model: nn.Module) -> KernelPaths:
    """{layer: {op: path}} for every cvt_fast attention layer in `model` (a cvt_fast model or a patched
    transformers one), from its last forward: "qkv_projection" and "attention" are "triton" or "eager: <reason>";
    "linear" (its q/k/v and output projections) is "onednn", "F.linear" or "F.linear: <reason>"."""
    paths = KernelPaths()
    for name, module in model.named_modules():
        if isinstance(module, CvtSelfAttention) and module.attention_route.taken:
            layer = {route.op: route.taken for route in (module.qkv_route, module.attention_route) if route.taken}
            linears = {m.route.taken for m in module.modules() if isinstance(m, CvtLinear) and m.route.taken}
            if linears:
                layer["linear"] = "; ".join(sorted(linears))
            paths[name.removesuffix(".attention.attention")] = layer
    return paths


class CvtPreTrainedModel(GradientCheckpointingMixin, nn.Module):
    """Config, backend, weight init and checkpoint loading/saving shared by both models."""

    base_model_prefix = "cvt"
    main_input_name = "pixel_values"
    _keys_to_ignore_on_save = None  # what transformers' Trainer asks of a model: every key is saved

    def __init__(self, config: CvtConfig, backend: str | None = None):
        super().__init__()
        if not isinstance(config, CvtConfig):
            raise TypeError(f"config must be a cvt_fast.CvtConfig, got {type(config).__name__}")
        config.validate()  # again: fields may have been assigned one by one since the config was made
        self.config = config
        self.name_or_path = ""  # the checkpoint from_pretrained loaded, as transformers' models keep it
        self._backend = resolve_backend(backend)
        prepare_backend(self._backend)

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() make their new tensors outside inference mode, as from_pretrained does: a model
        # loaded or moved inside torch.inference_mode() (common in serving code) can still be fine-tuned later, which
        # inference tensors cannot. Not for parameters that are inference tensors already (a copy made under
        # inference_mode): they keep their data in place, and ordinary data in an inference parameter is a state no
        # op accepts.
        if any(p.is_inference() for p in self.parameters()):
            return super()._apply(fn, recurse)
        with torch.inference_mode(False):
            return super()._apply(fn, recurse)

    @property
    def backend(self) -> str:
        return self._backend

    def set_backend(self, backend: str | None) -> None:
        """Switch every attention layer to "auto", "eager" or "triton" (None: CVT_FAST_BACKEND, else "auto"), and
        read the environment's other switches again (CVT_FAST_FP32_ATTENTION, CVT_FAST_ONEDNN_LINEAR)."""
        backend = resolve_backend(backend)
        prepare_backend(backend)  # refuses before any layer changes
        self._backend = backend
        for module in self.modules():
            if isinstance(module, CvtSelfAttention):
                module.backend = self._backend
            elif isinstance(module, CvtLinear):
                module.route = ops.LinearRoute()

    def kernel_paths(self) -> KernelPaths:
        """Which path each attention layer's fused ops took in the last forward (see kernel_paths)."""
        return kernel_paths(self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The parameters' elements (those that train, with only_trainable). CvT's embeddings are convolutions, not
        embedding tables, so exclude_embeddings leaves the count as it is, as in transformers' CvT."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @classmethod
    def can_generate(cls) -> bool:
        return False

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialisation: truncated normal for Linear/Conv2d weights and cls tokens, zero biases,
        unit LayerNorm/BatchNorm."""
        for module in self.modules():
            self._init_module(module)

    @torch.no_grad()
    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
        elif isinstance(module, CvtStage) and module.cls_token is not None:
            nn.init.trunc_normal_(module.cls_token, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Load a transformers CvT checkpoint: a save_pretrained directory (safetensors, sharded safetensors,
        pytorch_model.bin) or a hub id (needs huggingface_hub). See cvt_fast.loading.from_pretrained."""
        from .loading import from_pretrained

        return from_pretrained(cls, name_or_path, **kwargs)

    @classmethod
    def from_original(cls, checkpoint, spec, **kwargs):
        """Load a checkpoint of the original CvT (microsoft/CvT's .pth) with its spec: a YAML file, its MODEL.SPEC as
        a dict, or a preset name (cvt-13, cvt-21, cvt-w24, each also -384). The model runs the original's numerics
        (hidden_act "quick_gelu", stochastic_depth "original"); `kwargs` are config fields or `backend`. See
        cvt_fast.original."""
        from .original import load_original

        return load_original(cls, checkpoint, spec, **kwargs)

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write config.json and model.safetensors, which transformers' from_pretrained loads back."""
        from .loading import save_pretrained

        save_pretrained(self, directory, **kwargs)


class CvtModel(CvtPreTrainedModel):
    def __init__(
        self, config: CvtConfig, add_pooling_layer: bool = True, backend: str | None = None, *, _init: bool = True
    ):
        # add_pooling_layer is accepted for signature parity; CvT has no pooling layer (transformers ignores it too).
        super().__init__(config, backend)
        self.encoder = CvtEncoder(config, self.backend)
        if _init:  # skipped when built inside CvtForImageClassification, which initialises everything once
            self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithCLSToken | tuple:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        check_pixel_values(
            pixel_values, self.config, self.encoder.stages[0].embedding.convolution_embeddings.projection
        )
        outputs = self.encoder(pixel_values, output_hidden_states=output_hidden_states)
        return outputs if return_dict else outputs.to_tuple()


class CvtForImageClassification(CvtPreTrainedModel):
    def __init__(self, config: CvtConfig, backend: str | None = None):
        super().__init__(config, backend)
        self.num_labels = config.num_labels
        self.cvt = CvtModel(config, add_pooling_layer=False, backend=self.backend, _init=False)
        # The last *stage*: per-stage lists may be longer than depth (transformers accepts that, but then sizes this
        # by embed_dim[-1] and tests cls_token[-1], which belong to no stage).
        width = config.embed_dim[config.num_stages - 1]
        self.layernorm = nn.LayerNorm(width)
        self.classifier = CvtLinear(width, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        if return_dict is None:
            return_dict = self.config.return_dict
        outputs = self.cvt(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        if outputs.cls_token_value is not None:
            sequence_output = self.layernorm(outputs.cls_token_value)  # (B, 1, C)
        else:
            sequence_output = self.layernorm(ops.grid_to_tokens(outputs.last_hidden_state))  # (B, H*W, C)
        logits = self.classifier(sequence_output.mean(dim=1))  # (B, num_labels)
        loss = self._loss(logits, labels) if labels is not None else None
        result = ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        # The tuple form is (loss?, logits, hidden_states?). transformers builds it by position and, when the last
        # stage has no cls token, drops the hidden states (or crashes); this keeps them.
        return result if return_dict else result.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.problem_type is None:  # chosen once, and stored, as transformers does
            if config.num_labels == 1:
                config.problem_type = "regression"
            elif config.num_labels > 1 and labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        check_labels(labels, logits, config.problem_type)
        if config.problem_type == "regression":
            if config.num_labels == 1:
                return MSELoss()(logits.squeeze(), labels.squeeze())
            return MSELoss()(logits, labels)
        if config.problem_type == "single_label_classification":
            # int64 for cross_entropy, which refuses the int32 labels that (as in transformers) choose this loss
            return CrossEntropyLoss()(logits.view(-1, config.num_labels), labels.view(-1).long())
        return BCEWithLogitsLoss()(logits, labels)
