"""torchvision-equivalent ImageNet preprocessing, normalisation constants, decode errors."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dfq_jax.data import preprocess as pp


def _img(w, h, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_resize_size_matches_torchvision_integer_arithmetic():
  # Shorter side -> 256, longer side int(256 * long / short) (truncated, not rounded).
  assert pp.resize_shorter_size(300, 400, 256) == (256, 341)  # 341.33
  assert pp.resize_shorter_size(400, 300, 256) == (341, 256)
  assert pp.resize_shorter_size(500, 375, 256) == (341, 256)  # 341.33
  assert pp.resize_shorter_size(375, 500, 256) == (256, 341)
  assert pp.resize_shorter_size(299, 449, 256) == (256, 384)  # 384.43
  assert pp.resize_shorter_size(256, 256, 256) == (256, 256)
  assert pp.resize_shorter_size(640, 427, 256) == (383, 256)  # 383.70 -> 383


def test_center_crop_offsets_round_half_to_even():
  assert pp.center_crop_offsets(256, 256, 224) == (16, 16)
  # (341 - 224) / 2 = 58.5 -> 58 with Python's round (old torchvision's int((d+1)/2) gave 59).
  assert pp.center_crop_offsets(256, 341, 224) == (16, 58)
  assert pp.center_crop_offsets(339, 256, 224) == (58, 16)  # 57.5 -> 58
  assert pp.center_crop_offsets(384, 256, 224) == (80, 16)


def test_imagenet_transform_equals_plain_pil_resize_and_crop():
  for (w, h), (rw, rh), (left, top) in [
    ((300, 400), (256, 341), (16, 58)),
    ((500, 375), (341, 256), (58, 16)),
    ((256, 256), (256, 256), (16, 16)),
  ]:
    img = _img(w, h, seed=w)
    expected = img.resize((rw, rh), Image.BILINEAR).crop((left, top, left + 224, top + 224))
    got = pp.imagenet_transform(img)
    assert got.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_decode_image_imagenet_from_bytes_and_grayscale():
  img = _img(300, 400, seed=3).convert("L")
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  out = pp.decode_image(buf.getvalue(), "imagenet")
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  dec = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
  expected = dec.resize((256, 341), Image.BILINEAR).crop((16, 58, 240, 282))
  np.testing.assert_array_equal(out, np.asarray(expected))
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_center_crop_pads_small_images_like_torchvision():
  img = _img(100, 50, seed=1)
  # Resize(200): (400, 200); CenterCrop(224): pad height by 12 + 12, crop width from 88.
  out = np.asarray(pp.imagenet_transform(img, resize_size=200, crop_size=224))
  assert out.shape == (224, 224, 3)
  assert not out[:12].any() and not out[-12:].any()
  ref = np.asarray(img.resize((400, 200), Image.BILINEAR))[:, 88:312]
  np.testing.assert_array_equal(out[12:212], ref)


def test_decode_errors():
  with pytest.raises(ValueError, match="Cannot decode image <bytes>"):
    pp.decode_image(b"not an image", "cifar")
  with pytest.raises(ValueError, match="Cannot decode image .*missing.png"):
    pp.decode_image("/nonexistent/missing.png", "cifar")
  buf = io.BytesIO()
  _img(40, 32).save(buf, format="PNG")
  with pytest.raises(ValueError, match="thing is 40x32.*32x32"):
    pp.decode_image(buf.getvalue(), "cifar", what="thing")
  with pytest.raises(ValueError, match="40x32.*40x40"):
    pp.decode_image(buf.getvalue(), pp.Preprocessing("cifar", image_size=40))


def test_normalize_numpy_and_jax():
  x = np.array([[[[0, 128, 255]]]], np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  want = (np.array([0, 128, 255], np.float32) / np.float32(255) - np.float32(mean)) / np.float32(
    std
  )
  got = pp.normalize(x, mean, std)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32
  np.testing.assert_allclose(got[0, 0, 0], want, rtol=1e-6)
  gj = pp.normalize(jnp.asarray(x), mean, std)
  assert gj.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(gj)[0, 0, 0], want, rtol=1e-6)
  with pytest.raises(TypeError, match="uint8"):
    pp.normalize(x.astype(np.float32), mean, std)
  with pytest.raises(ValueError, match="channels-last"):
    pp.normalize(np.zeros((1, 3, 4, 4), np.uint8), mean, std)


def test_presets():
  assert pp.get_normalization("cifar10").mean == (0.49139968, 0.48215827, 0.44653124)
  assert pp.get_normalization("CIFAR10").std == (0.24703233, 0.24348505, 0.26158768)
  assert pp.get_normalization("cifar100").mean == (0.50705882, 0.48666667, 0.44078431)
  assert pp.get_normalization("cifar100").std == (0.26745098, 0.25568627, 0.27607843)
  assert pp.get_normalization("imagenet") == pp.Normalization(
    (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  )
  # The akamaster CIFAR ResNet-20 was trained with the ImageNet constants.
  assert pp.get_normalization("akamaster_resnet20") == pp.IMAGENET_NORM
  assert pp.get_normalization("pytorchcv_cifar10") == pp.CIFAR10_NORM
  with pytest.raises(KeyError, match="known presets"):
    pp.get_normalization("mnist")
