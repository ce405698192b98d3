"""The fine-tuning recipe users follow (transformers' image-classification example: a `datasets` imagefolder from a
local folder, the checkpoint's image processor as the transform, a new head with ignore_mismatched_sizes, Trainer),
run end to end with a cvt_fast model and with cvt_fast.patch on transformers' model; and transformers' pipeline on a
patched model against `cvt-fast classify`. Everything local: a folder of images and a checkpoint made here."""

import numpy as np
import pytest
import torch

import cvt_fast
from cvt_fast import cli
from cvt_fast.image_processing import CvtImageProcessor

from support.helpers import rel_err

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

from cvt_fast.integrations import SaveConfigCallback  # noqa: E402

pytestmark = pytest.mark.ecosystem

CLASSES = ["apple", "kiwi", "plum"]
PRETRAINED = dict(num_labels=5, embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2], cls_token=[False, True])


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A 'pretrained' checkpoint (5 labels, saved by transformers, with its preprocessor config) and an image
    folder of three classes, one subfolder each."""
    root = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    transformers.CvtForImageClassification(transformers.CvtConfig(**PRETRAINED)).save_pretrained(root / "pretrained")
    CvtImageProcessor(size=32).save_pretrained(root / "pretrained")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, size=(40 + i, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    return root


def recipe(local, output, make_model):
    """The example's steps: dataset, labels, model with a new head, processor as transform, collator, Trainer."""
    dataset = datasets.load_dataset("imagefolder", data_dir=str(local / "images"), split="train")
    labels = dataset.features["label"].names
    label2id = {name: i for i, name in enumerate(labels)}
    id2label = {i: name for i, name in enumerate(labels)}
    model = make_model(
        str(local / "pretrained"), num_labels=len(labels), label2id=label2id, id2label=id2label,
        ignore_mismatched_sizes=True,
    )  # fmt: skip
    processor = CvtImageProcessor.from_pretrained(local / "pretrained")

    def transform(batch):
        batch["pixel_values"] = [processor(image.convert("RGB"))["pixel_values"][0] for image in batch["image"]]
        return batch

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples]),
        }

    args = transformers.TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
        remove_unused_columns=False, save_strategy="epoch", report_to=[], use_cpu=True, seed=3, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset.with_transform(transform), data_collator=collate,
        processing_class=processor, callbacks=[SaveConfigCallback()],
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    return trainer, dataset.with_transform(transform)


@pytest.mark.parametrize("kind", ["cvt_fast model", "patched transformers model"])
def test_the_image_classification_recipe_end_to_end(kind, local, tmp_path):
    if kind == "cvt_fast model":
        make_model = cvt_fast.CvtForImageClassification.from_pretrained
    else:

        def make_model(*args, **kwargs):
            return cvt_fast.patch(transformers.CvtForImageClassification.from_pretrained(*args, **kwargs))

    trainer, dataset = recipe(local, tmp_path, make_model)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(4)])
    trainer.model.eval()
    with torch.inference_mode():
        expected = trainer.model(pixel_values=pixels).logits
    ours = cvt_fast.CvtForImageClassification.from_pretrained(tmp_path).eval()
    theirs = transformers.CvtForImageClassification.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert rel_err(ours(pixel_values=pixels).logits, expected) < 2e-5
        assert rel_err(theirs(pixel_values=pixels).logits, expected) < 2e-5
    # the label maps as transformers' own recipe writes them: class names from the folders, integer ids
    assert theirs.config.id2label == dict(enumerate(CLASSES)) == ours.config.id2label
    assert theirs.config.label2id == {name: i for i, name in enumerate(CLASSES)} == ours.config.label2id
    assert (tmp_path / "preprocessor_config.json").is_file() and (tmp_path / "checkpoint-6" / "config.json").is_file()


def test_a_pipeline_on_a_patched_model_agrees_with_cvt_fast_classify(local, tmp_path, capsys):
    """transformers' image-classification pipeline over a patched model and cvt-fast classify over the same
    checkpoint give the same top labels and scores for the same image file."""
    image = local / "images" / "kiwi" / "2.png"
    model = cvt_fast.patch(transformers.CvtForImageClassification.from_pretrained(local / "pretrained"))
    processor = transformers.AutoImageProcessor.from_pretrained(local / "pretrained")
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    predictions = pipe(str(image), top_k=3)
    assert cli.main(["classify", "--model", str(local / "pretrained"), "--top-k", "3", str(image)]) == 0
    printed = capsys.readouterr().out.splitlines()[1:]
    ours = [(line.split()[1], float(line.split()[0].rstrip("%")) / 100) for line in printed]
    assert [label for label, _ in ours] == [p["label"] for p in predictions]
    for (_, score), p in zip(ours, predictions, strict=True):
        assert abs(score - p["score"]) < 6e-5  # classify prints percent to two decimals


def test_the_documented_pipeline_recipe_works_on_a_folder_without_a_preprocessor_config(local, tmp_path):
    """docs/training.md's pipeline recipe on a folder as save_pretrained writes it (no preprocessor_config.json):
    cvt_fast's default preprocessing is written first, then transformers' AutoImageProcessor reads it."""
    folder = tmp_path / "weights-only"
    transformers.CvtForImageClassification.from_pretrained(local / "pretrained").save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists()
    CvtImageProcessor.from_pretrained(folder).save_pretrained(folder)  # as the docs say, where the file is missing
    model = cvt_fast.patch(transformers.CvtForImageClassification.from_pretrained(folder))
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    predictions = pipe(str(local / "images" / "kiwi" / "1.png"), top_k=2)
    assert len(predictions) == 2 and processor.crop_pct == CvtImageProcessor().crop_pct
