"""CvtBackbone: CvT as a feature extractor for detection, segmentation and probing, at any image size.

The chosen stages' feature maps (B, C, H, W) come out at their strides (4, 8 and 16 pixels for the CvT presets),
with the names and indexing of transformers' backbones: config.out_features ("stage1".."stageN"; CvT has no stem)
or config.out_indices, the last stage by default. The weights are CvtModel's (`encoder.*`), so the backbone loads
CvtModel and CvtForImageClassification checkpoints alike (a classifier's head is left out). Stages after the last
one asked for are not run. CvT has no position embedding and every kernel takes any grid, so H and W can be odd,
non-square and far above the 224 px the checkpoints were trained at; memory grows linearly with the pixels.
"""

from __future__ import annotations

import torch

from .checks import check_pixel_values
from .config import CvtConfig
from .modeling import CvtEncoder, CvtPreTrainedModel
from .outputs import BackboneOutput


class CvtBackbone(CvtPreTrainedModel):
    def __init__(self, config: CvtConfig, backend: str | None = None, *, _init: bool = True):
        super().__init__(config, backend)
        self.encoder = CvtEncoder(config, self.backend)  # CvtModel's modules and keys
        if _init:
            self.init_weights()

    @property
    def stage_names(self) -> list[str]:
        return self.config.stage_names

    @property
    def out_features(self) -> list[str]:
        return self.config.backbone_stages()[0]

    @property
    def out_indices(self) -> list[int]:
        return self.config.backbone_stages()[1]

    @property
    def channels(self) -> list[int]:
        """Channels of each returned feature map."""
        return [self.config.embed_dim[i] for i in self.out_indices]

    @property
    def reductions(self) -> list[int]:
        """Stride in pixels of each returned feature map (4, 8, 16 for the presets' stages)."""
        strides = self.config.stage_strides()
        return [strides[i] for i in self.out_indices]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_cls_tokens: bool = False,
        return_dict: bool | None = None,
    ) -> BackboneOutput | tuple:
        """pixel_values (B, num_channels, H, W) -> BackboneOutput(feature_maps, hidden_states, cls_tokens).
        feature_maps equal CvtModel's hidden_states for the chosen stages."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        stages = self.encoder.stages
        check_pixel_values(pixel_values, self.config, stages[0].embedding.convolution_embeddings.projection)
        indices = self.out_indices
        last = len(stages) - 1 if output_hidden_states else max(indices)
        maps, cls_tokens = [], []
        hidden_state = pixel_values
        for stage in stages[: last + 1]:
            hidden_state, cls_token = stage(hidden_state)  # (B, C, H, W), (B, 1, C) or None
            maps.append(hidden_state)
            cls_tokens.append(cls_token)
        output = BackboneOutput(
            feature_maps=tuple(maps[i] for i in indices),
            hidden_states=tuple(maps) if output_hidden_states else None,
            cls_tokens=tuple(cls_tokens[i] for i in indices) if output_cls_tokens else None,
        )
        return output if return_dict else output.to_tuple()
