"""cvt_fast models in transformers' Trainer. Trainer saves a model that is not one of transformers' own as its weights
alone; SaveConfigCallback writes the model's config.json (and, given one, the image processor's config) beside them,
in every checkpoint folder and in the output folder, so that what Trainer saves loads back in cvt_fast and in
transformers alike. A transformers model patched by cvt_fast needs none of this: Trainer saves it as its own.

Importing this module imports transformers.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback


class SaveConfigCallback(TrainerCallback):
    """Trainer(..., callbacks=[SaveConfigCallback(processor)]): config.json beside the weights of each checkpoint
    (checkpoint-N, which resume_from_checkpoint reads) and, at the end of training, in args.output_dir, where
    trainer.save_model() writes the final weights."""

    def __init__(self, processor=None):
        self.processor = processor

    def on_save(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            self._write(Path(args.output_dir) / f"checkpoint-{state.global_step}", model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.should_save:
            self._write(Path(args.output_dir), model)

    def _write(self, folder: Path, model) -> None:
        model = getattr(model, "module", model)  # DistributedDataParallel's wrapper
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "save_pretrained"):
            return
        config.save_pretrained(folder)
        if self.processor is not None:
            self.processor.save_pretrained(folder)
