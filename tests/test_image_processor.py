"""CvtImageProcessor against transformers' ConvNextImageProcessor on random images."""

import json

import numpy as np
import pytest
import torch

from cvt_fast.image_processing import CvtImageProcessor

pytestmark = pytest.mark.unit

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


def inputs_and_rgb_equivalents(rng):
    """{kind: (input, what transformers gets instead)}. transformers takes the uint8 (H, W, 3) array itself. It
    refuses one channel or four against a three-channel mean, so there the oracle is transformers on the RGB image
    the input stands for: a grayscale value repeated in all three channels, an alpha channel dropped (PIL's "L" and
    "RGBA" to "RGB")."""
    rgb = rng.integers(0, 256, size=(250, 330, 3), dtype=np.uint8)
    gray, alpha = rgb[..., 0].copy(), rgb[..., 1:2]
    gray_as_rgb, rgba = np.repeat(gray[..., None], 3, axis=-1), np.concatenate([rgb, alpha], axis=-1)
    return {
        "numpy (H, W, 3)": (rgb, rgb),
        "numpy (H, W)": (gray, gray_as_rgb),
        "numpy (H, W, 1)": (gray[..., None], gray_as_rgb),
        "numpy (H, W, 4)": (rgba, rgb),
        "PIL L": (Image.fromarray(gray, mode="L"), gray_as_rgb),
        "PIL RGBA": (Image.fromarray(rgba, mode="RGBA"), rgb),
    }


KINDS = list(inputs_and_rgb_equivalents(np.random.default_rng(0)))


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_grayscale_and_alpha_inputs_by_value(kind):
    image, rgb = inputs_and_rgb_equivalents(np.random.default_rng(KINDS.index(kind)))[kind]
    expected = transformers_processor()(rgb, return_tensors="pt")["pixel_values"]
    assert torch.equal(CvtImageProcessor()(image)["pixel_values"], expected)


def test_a_batch_of_mixed_inputs_is_each_image_by_value():
    cases = list(inputs_and_rgb_equivalents(np.random.default_rng(5)).values())
    cases.append((random_image(np.random.default_rng(6), 280, 256), None))
    images = [image for image, _ in cases]
    out = CvtImageProcessor()(images)["pixel_values"]
    assert out.shape == (len(images), 3, 224, 224)
    for row, (image, rgb) in zip(out, cases, strict=True):
        expected = transformers_processor()(image if rgb is None else rgb, return_tensors="pt")["pixel_values"]
        assert torch.equal(row, expected[0])


# Every option against transformers: a processor that ignores one (an unused resample, a crop at 384 and above, a
# rescale done twice) differs.
OPTIONS = [
    dict(resample=0), dict(resample=1), dict(resample=2), dict(resample=4), dict(resample=5),
    dict(crop_pct=0.95), dict(crop_pct=1.0, size=160), dict(size=384, resample=2), dict(size=400),
    dict(do_normalize=False), dict(do_rescale=False), dict(do_rescale=False, do_normalize=False), dict(do_resize=False),
    dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25]), dict(rescale_factor=1 / 127.5),
    # crop_pct above 1: the resized image is smaller than the crop, which zero-pads it (odd margins: the rounding)
    dict(crop_pct=1.15), dict(crop_pct=1.3, size=160), dict(crop_pct=1.07, size=97),
]  # fmt: skip


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options_match_transformers(options):
    image = random_image(np.random.default_rng(len(str(options))), 301, 247)
    theirs = dict(options, size={"shortest_edge": options["size"]}) if "size" in options else options
    expected = transformers_processor(**theirs)(image, return_tensors="pt")["pixel_values"]
    actual = CvtImageProcessor(**options)(image)["pixel_values"]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(actual, expected)


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
    with pytest.raises(TypeError, match="must be uint8"):  # transformers would guess whether it is 0..1 or 0..255
        processor(np.full((10, 10, 3), 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"must be \(H, W\), \(H, W, 3\) or \(H, W, 4\), got shape \(3, 40, 50\)"):
        processor(np.zeros((3, 40, 50), dtype=np.uint8))  # channels first: refused, not read as a 3-row image
    with pytest.raises(ValueError, match="no images"):
        processor([])


def test_a_checkpoint_without_preprocessor_config_gets_the_defaults_and_an_empty_folder_is_refused(tmp_path, caplog):
    """transformers' model.save_pretrained writes no preprocessor_config.json: such a folder (config.json present)
    gets CvT's default preprocessing, with a warning; a folder with neither file is no checkpoint."""
    import cvt_fast

    cvt_fast.CvtConfig().save_pretrained(tmp_path / "checkpoint")
    processor = CvtImageProcessor.from_pretrained(tmp_path / "checkpoint", crop_pct=0.5)
    assert processor.to_dict() == {**CvtImageProcessor().to_dict(), "crop_pct": 0.5}
    assert "has no preprocessor_config.json; using CvT's default preprocessing" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(cvt_fast.CheckpointNotFoundError, match="has neither preprocessor_config.json nor config.json"):
        CvtImageProcessor.from_pretrained(tmp_path / "empty")
