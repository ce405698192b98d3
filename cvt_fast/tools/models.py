"""The models every tool measures: cvt_fast's, with random weights the same on every machine, and transformers' twin
of it holding the same weights (the baseline)."""

from __future__ import annotations

import torch

from ..config import CvtConfig
from ..errors import Refused
from ..modeling import CvtForImageClassification, CvtModel
from ..testing import randomize_


def random_model(
    config: CvtConfig | str, generator: torch.Generator | None = None, backend: str | None = "eager", head: bool = True
) -> CvtForImageClassification | CvtModel:
    """`config` (a CvtConfig, a preset name such as "cvt-13", or a config.json path) in eval mode, with random
    weights drawn on the CPU from `generator` (default: seeded with 0), so the same in every process and on every
    machine. `head=False` builds the CvtModel backbone."""
    if not isinstance(config, CvtConfig):
        config = CvtConfig.from_pretrained(config)
    model = (CvtForImageClassification if head else CvtModel)(config, backend=backend)
    return randomize_(model, generator if generator is not None else torch.Generator().manual_seed(0)).eval()


def transformers_twin(model):
    """transformers' CvtForImageClassification with `model`'s config and a copy of its weights: the baseline every
    benchmark holds cvt_fast against."""
    import transformers

    from ..config import transformers_runs_otherwise

    otherwise = transformers_runs_otherwise(model.config)
    if otherwise:
        raise Refused(f"transformers would run another model: {'; '.join(otherwise)}")
    config = transformers.CvtConfig(**{k: v for k, v in model.config.to_dict().items() if k != "model_type"})
    twin = transformers.CvtForImageClassification(config)
    twin.load_state_dict(model.state_dict())
    return twin
