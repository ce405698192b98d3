"""CvT as its authors define it (arXiv 2103.15808 and microsoft/CvT's lib/models/cls_cvt.py), written here from that
definition and nothing of cvt_fast: the oracle for cvt_fast's original numerics and for its loader of original
checkpoints. Its modules carry the original's names, so its state_dict is a checkpoint in the original layout
(stage0.patch_embed.proj.weight, stage2.blocks.3.attn.conv_proj_q.conv.weight, stage2.cls_token, norm, head).

What the original does that transformers does not: QuickGELU in the MLP, dropout after the MLP's activation too,
stochastic depth on the attention and MLP branches (never on the residual stream), with layer j of a stage at the
j-th of linspace(0, rate, depth). Drop path draws its mask as the timm of the paper's time did: floor(keep + U[0,1)).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# The spec of a small model, with the original's field names (MODEL.SPEC in its YAML files).
SMALL_SPEC = {
    "NUM_STAGES": 3,
    "PATCH_SIZE": [7, 3, 3],
    "PATCH_STRIDE": [4, 2, 2],
    "PATCH_PADDING": [2, 1, 1],
    "DIM_EMBED": [16, 32, 48],
    "NUM_HEADS": [1, 2, 3],
    "DEPTH": [1, 2, 3],
    "MLP_RATIO": [4.0, 4.0, 2.0],
    "ATTN_DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_RATE": [0.0, 0.0, 0.0],
    "DROP_PATH_RATE": [0.0, 0.3, 0.6],
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


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device))
    return x / keep * mask


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias, attn_drop, proj_drop, method, kernel, stride_kv, stride_q, pad_kv, pad_q,
                 with_cls):  # fmt: skip
        super().__init__()
        self.heads, self.scale, self.with_cls = heads, dim**-0.5, with_cls
        self.conv_proj_q = self._projection(dim, kernel, pad_q, stride_q, "linear" if method == "avg" else method)
        self.conv_proj_k = self._projection(dim, kernel, pad_kv, stride_kv, method)
        self.conv_proj_v = self._projection(dim, kernel, pad_kv, stride_kv, method)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @staticmethod
    def _projection(dim, kernel, padding, stride, method):
        if method == "dw_bn":
            conv = nn.Conv2d(dim, dim, kernel, stride=stride, padding=padding, bias=False, groups=dim)
            return nn.Sequential(OrderedDict([("conv", conv), ("bn", nn.BatchNorm2d(dim))]))
        if method == "avg":
            return nn.Sequential(OrderedDict([("avg", nn.AvgPool2d(kernel, stride, padding, ceil_mode=True))]))
        return None

    def forward(self, x, h, w):
        cls = x[:, :1] if self.with_cls else None
        tokens = x[:, 1:] if self.with_cls else x
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        projected = []
        for projection in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v):
            y = projection(grid) if projection is not None else grid
            y = y.flatten(2).transpose(1, 2)
            projected.append(torch.cat((cls, y), dim=1) if cls is not None else y)
        q, k, v = (
            linear(t).reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
            for linear, t in zip((self.proj_q, self.proj_k, self.proj_v), projected, strict=True)
        )
        attention = self.attn_drop(F.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1))
        out = (attention @ v).transpose(1, 2).flatten(2)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(quick_gelu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim, mlp_ratio, drop, drop_path_rate, **attention):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, proj_drop=drop, **attention)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path_rate = drop_path_rate

    def forward(self, x, h, w):
        x = x + drop_path(self.attn(self.norm1(x), h, w), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class ConvEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim, stride, padding):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        grid = self.proj(x)
        return self.norm(grid.flatten(2).transpose(1, 2)), grid.shape[2], grid.shape[3]


class Stage(nn.Module):
    def __init__(self, spec, i, in_chans):
        super().__init__()
        dim, depth = spec["DIM_EMBED"][i], spec["DEPTH"][i]
        self.patch_embed = ConvEmbed(spec["PATCH_SIZE"][i], in_chans, dim, spec["PATCH_STRIDE"][i],
                                     spec["PATCH_PADDING"][i])  # fmt: skip
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec["CLS_TOKEN"][i] else None
        self.pos_drop = nn.Dropout(spec["DROP_RATE"][i])
        rates = [r.item() for r in torch.linspace(0, spec["DROP_PATH_RATE"][i], depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                spec["MLP_RATIO"][i],
                spec["DROP_RATE"][i],
                rates[j],
                heads=spec["NUM_HEADS"][i],
                qkv_bias=spec["QKV_BIAS"][i],
                attn_drop=spec["ATTN_DROP_RATE"][i],
                method=spec["QKV_PROJ_METHOD"][i],
                kernel=spec["KERNEL_QKV"][i],
                stride_kv=spec["STRIDE_KV"][i],
                stride_q=spec["STRIDE_Q"][i],
                pad_kv=spec["PADDING_KV"][i],
                pad_q=spec["PADDING_Q"][i],
                with_cls=spec["CLS_TOKEN"][i],
            )  # fmt: skip
            for j in range(depth)
        )

    def forward(self, x):
        x, h, w = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, h, w)
        cls = x[:, :1] if self.cls_token is not None else None
        tokens = x[:, 1:] if self.cls_token is not None else x
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w), cls


class OriginalCvT(nn.Module):
    def __init__(self, spec: dict, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.num_stages = spec["NUM_STAGES"]
        for i in range(self.num_stages):
            setattr(self, f"stage{i}", Stage(spec, i, in_chans))
            in_chans = spec["DIM_EMBED"][i]
        self.norm = nn.LayerNorm(spec["DIM_EMBED"][-1], eps=1e-5)
        self.head = nn.Linear(spec["DIM_EMBED"][-1], num_classes)
        self.last_has_cls = spec["CLS_TOKEN"][-1]

    def forward(self, x):
        for i in range(self.num_stages):
            x, cls = getattr(self, f"stage{i}")(x)
        if self.last_has_cls:
            features = self.norm(cls)[:, 0]
        else:
            features = self.norm(x.flatten(2).transpose(1, 2)).mean(dim=1)
        return self.head(features)
