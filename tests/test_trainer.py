"""cvt_fast inside transformers' Trainer, driven through Trainer itself on a tiny config and random local data: train,
evaluate, predict, checkpoints, resume, save and reload (in cvt_fast and in transformers, with the same logits),
checkpointing of activations, bfloat16 autocast, and the mistakes a dataset can hold. Also a transformers model
patched by cvt_fast, which Trainer saves as its own."""

import shutil

import pytest
import torch

import cvt_fast

from support.helpers import TRAINABLE, rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from cvt_fast.integrations import SaveConfigCallback  # noqa: E402

pytestmark = pytest.mark.ecosystem

CONFIG = dict(
    TRAINABLE,
    embed_dim=[16, 32],  # the eager path only: smaller is quicker
    num_labels=3,
    id2label={0: "cat", 1: "dog", 2: "bird"},
    label2id={"cat": 0, "dog": 1, "bird": 2},
)


class Images(torch.utils.data.Dataset):
    """Random images and labels, as a dataset of {"pixel_values", "labels"} records (and extra columns if asked)."""

    def __init__(self, count, seed, labels=True, side=32, label_range=3):
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(count, 3, side, side, generator=generator)
        self.labels = torch.randint(0, label_range, (count,), generator=generator) if labels else None

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        record = {"pixel_values": self.pixels[i]}
        if self.labels is not None:
            record["labels"] = self.labels[i]
        return record


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return cvt_fast.CvtForImageClassification(cvt_fast.CvtConfig(**CONFIG))


def arguments(folder, **overrides):
    settings = dict(
        output_dir=str(folder), per_device_train_batch_size=4, per_device_eval_batch_size=4, num_train_epochs=2,
        learning_rate=1e-2, save_strategy="epoch", eval_strategy="epoch", report_to=[], use_cpu=True, seed=7,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return transformers.TrainingArguments(**{**settings, **overrides})


def logits(model, x):
    model.eval()
    with torch.inference_mode():
        return model(pixel_values=x).logits


def test_train_checkpoint_resume_save_and_reload(tmp_path):
    """Two epochs with a checkpoint after each; a run resumed from the first checkpoint ends with the same weights
    as the uninterrupted one; what Trainer saves loads back in cvt_fast and transformers with the same logits."""
    train, evaluation, probe = Images(16, 1), Images(8, 2), Images(4, 3).pixels
    before = logits(fresh_model(), probe)  # before Trainer seeds: the two runs must see the same random streams
    trainer = transformers.Trainer(
        model=fresh_model(), args=arguments(tmp_path / "run"), train_dataset=train, eval_dataset=evaluation,
        callbacks=[SaveConfigCallback()],
    )  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["epoch"] == 2.0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    predictions = trainer.predict(Images(4, 3)).predictions
    trained = trainer.model
    expected = logits(trained, probe)
    assert rel_err(torch.from_numpy(predictions), expected) < 2e-5
    assert rel_err(expected, before) > 1e-2, "training should move the logits"
    trainer.save_model()

    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoint-8"):
        ours = cvt_fast.CvtForImageClassification.from_pretrained(folder)
        theirs = transformers.CvtForImageClassification.from_pretrained(folder)
        assert rel_err(logits(ours, probe), expected) < 2e-5, folder
        assert rel_err(logits(theirs, probe), expected) < 2e-5, folder
        assert theirs.config.id2label == CONFIG["id2label"] and ours.config.id2label == CONFIG["id2label"]

    shutil.copytree(tmp_path / "run" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = transformers.Trainer(
        model=fresh_model(), args=arguments(tmp_path / "resumed"), train_dataset=train, eval_dataset=evaluation,
        callbacks=[SaveConfigCallback()],
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    for (name, a), b in zip(trained.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming"


def test_without_the_callback_a_weights_only_folder_is_refused_with_the_remedy(tmp_path):
    trainer = transformers.Trainer(model=fresh_model(), args=arguments(tmp_path, num_train_epochs=1,
                                   save_strategy="no", eval_strategy="no"), train_dataset=Images(8, 1))  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    with pytest.raises(cvt_fast.CheckpointNotFoundError, match=r"has no config.json \(transformers' Trainer saves"):
        cvt_fast.CvtForImageClassification.from_pretrained(tmp_path / "final")


@pytest.mark.parametrize("setting", ["gradient_checkpointing", "torch_compile", "bf16", "remove_unused_columns"])
def test_trainer_settings(setting, tmp_path):
    """gradient_checkpointing=True reaches the model (activation_checkpointing_enable) and gives the same step as
    without, and so does torch_compile=True (inductor: float rounding apart); bf16=True trains under CPU autocast; a
    datasets.Dataset with extra columns is trimmed to the model's inputs (remove_unused_columns, label_names)."""
    train = Images(8, 1)
    torch._dynamo.reset()  # what earlier tests compiled would make this compile with dynamic shapes (see docs)
    if setting in ("gradient_checkpointing", "torch_compile"):
        plain = transformers.Trainer(model=fresh_model(), args=arguments(tmp_path / "a", num_train_epochs=1,
                                     eval_strategy="no", save_strategy="no"), train_dataset=train)  # fmt: skip
        plain.train()
        checkpointed = transformers.Trainer(
            model=fresh_model(), train_dataset=train,
            args=arguments(tmp_path / "b", num_train_epochs=1, eval_strategy="no", save_strategy="no",
                           **{setting: True}),
        )  # fmt: skip
        checkpointed.train()
        if setting == "gradient_checkpointing":
            assert checkpointed.model.is_gradient_checkpointing
            pairs = zip(plain.model.state_dict().items(), checkpointed.model.state_dict().values(), strict=True)
            for (name, a), b in pairs:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        else:  # AdamW turns rounding-level gradient differences into lr-sized steps: compare the losses instead
            assert type(checkpointed.model_wrapped).__name__ == "OptimizedModule"
            losses = [[float(h["loss"]) for h in t.state.log_history if "loss" in h] for t in (plain, checkpointed)]
            assert len(losses[0]) == 2
            torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=0)
    elif setting == "bf16":
        trainer = transformers.Trainer(model=fresh_model(), train_dataset=train, args=arguments(
            tmp_path, num_train_epochs=1, eval_strategy="no", save_strategy="no", bf16=True))  # fmt: skip
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        result = trainer.train()
        assert torch.isfinite(torch.tensor(result.training_loss))
        assert trainer.model.dtype == torch.float32  # autocast: the weights stay float32
        assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    else:
        datasets = pytest.importorskip("datasets")
        table = datasets.Dataset.from_dict({
            "pixel_values": train.pixels.numpy(), "labels": train.labels.numpy(), "file_name": ["x.png"] * 8,
        }).with_format("torch")  # fmt: skip
        trainer = transformers.Trainer(model=fresh_model(), train_dataset=table, args=arguments(
            tmp_path, num_train_epochs=1, eval_strategy="no", save_strategy="no", label_names=["labels"]))  # fmt: skip
        assert torch.isfinite(torch.tensor(trainer.train().training_loss))


@pytest.mark.parametrize(
    "dataset, message",
    [
        (Images(8, 1, label_range=5), r"labels must be class indices in \[0, 3\)"),
        (Images(8, 1, side=4), r"smaller than the model.s total stride|too small"),
    ],
    ids=["labels outside num_labels", "images too small"],
)
def test_mistakes_in_the_data_are_named_by_cvt_fast(dataset, message, tmp_path):
    trainer = transformers.Trainer(model=fresh_model(), train_dataset=dataset, args=arguments(
        tmp_path, num_train_epochs=1, eval_strategy="no", save_strategy="no"))  # fmt: skip
    with pytest.raises(cvt_fast.InputError, match=message):
        trainer.train()


def test_a_patched_transformers_model_is_saved_by_trainer_as_its_own(tmp_path):
    """cvt_fast.patch on transformers' model: Trainer saves it natively (config.json included), and the result loads
    in cvt_fast and transformers with the logits of the trained model."""
    torch.manual_seed(0)
    model = cvt_fast.patch(transformers.CvtForImageClassification(transformers.CvtConfig(**CONFIG)))
    trainer = transformers.Trainer(model=model, train_dataset=Images(16, 1), args=arguments(
        tmp_path, eval_strategy="no", save_strategy="no"))  # fmt: skip
    trainer.train()
    trainer.save_model()
    probe = Images(4, 3).pixels
    expected = logits(trainer.model, probe)
    assert cvt_fast.kernel_paths(trainer.model)  # the fast layers are what trained
    for loaded in (
        cvt_fast.CvtForImageClassification.from_pretrained(tmp_path),
        transformers.CvtForImageClassification.from_pretrained(tmp_path),
    ):
        assert rel_err(logits(loaded, probe), expected) < 2e-5


def test_the_training_benchmark_measures_a_step_against_transformers(tmp_path, capsys):
    """cvt-fast bench --train on a tiny config: a record per implementation with its speed, what autograd keeps and
    its gradient error against float64, written to train.json and train.md. The 1e-2 bound is a sanity bound, not
    the numerics rule: on a model this small the worst parameter's float32 gradient error was 2.5e-3 for
    transformers and 6.7e-3 for cvt_fast (SDPA's CPU flash backward; docs/training.md); CvT-13 is documented."""
    import json

    from cvt_fast import cli

    config = tmp_path / "tiny.json"
    config.write_text(cvt_fast.CvtConfig(**{k: v for k, v in CONFIG.items() if "label" not in k}).to_json_string())
    argv = ["bench", "--train", "--models", str(config), "--sizes", "32", "--batches", "2", "--rounds", "1",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 0
    records = json.loads((tmp_path / "out" / "train.json").read_text())
    assert [r["implementation"] for r in records] == ["transformers", "cvt_fast"]
    for r in records:
        assert r["images_per_s"] > 0 and r["saved_bytes"] > 0 and 0 <= r["grad_err"] < 1e-2, r
    assert "grad err" in capsys.readouterr().out
    assert cli.main(["bench", "--train", "--resolutions", "224"]) == 2
    assert "argument --train: not with --resolutions" in capsys.readouterr().err
