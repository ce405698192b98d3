"""CvtImageProcessor against transformers' ConvNextImageProcessor on random images."""

import json

import numpy as np
import pytest
import torch

from cvt_fast.image_processing import CvtImageProcessor

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

CVT_PREPROCESSOR = {  # what the CvT checkpoints on the hub ship
    "crop_pct": 0.875,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": 224,
}


def transformers_processor(**kwargs):
    return transformers.ConvNextImageProcessor(**{**CVT_PREPROCESSOR, **kwargs})


def random_image(rng, height, width, mode="RGB"):
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)


@pytest.mark.parametrize("size", [224, 160, 384, 448])
@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (224, 224), (97, 131), (1000, 37)])
def test_matches_transformers(size, shape):
    rng = np.random.default_rng(size * 7 + shape[0])
    image = random_image(rng, *shape)
    expected = transformers_processor(size={"shortest_edge": size})(image, return_tensors="pt")["pixel_values"]
    actual = CvtImageProcessor(size=size)(image)["pixel_values"]
    assert actual.shape == expected.shape == (1, 3, size, size)
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected)


def test_batch_numpy_and_grayscale_inputs():
    rng = np.random.default_rng(0)
    images = [random_image(rng, 250, 330), np.asarray(random_image(rng, 280, 256)), random_image(rng, 300, 300, "L")]
    out = CvtImageProcessor()(images)
    assert out.pixel_values.shape == (3, 3, 224, 224)
    expected = transformers_processor()(images[0], return_tensors="pt")["pixel_values"]
    assert torch.equal(out.pixel_values[:1], expected)


def test_reads_preprocessor_config_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**CVT_PREPROCESSOR, "size": 384}))
    processor = CvtImageProcessor.from_pretrained(tmp_path)
    assert processor.size == 384 and processor.crop_pct == 0.875
    image = random_image(np.random.default_rng(1), 500, 420)
    expected = transformers.ConvNextImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")
    assert torch.equal(processor(image).pixel_values, expected["pixel_values"])


def test_written_config_is_read_back_by_transformers(tmp_path):
    CvtImageProcessor(size=256, crop_pct=0.9).save_pretrained(tmp_path)
    theirs = transformers.ConvNextImageProcessor.from_pretrained(tmp_path)
    assert theirs.size["shortest_edge"] == 256 and theirs.crop_pct == 0.9


def test_bad_images_are_refused():
    processor = CvtImageProcessor()
    with pytest.raises(TypeError, match="PIL image or a uint8 numpy array"):
        processor("cat.jpg")
    with pytest.raises(TypeError, match="must be uint8"):
        processor(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no images"):
        processor([])
