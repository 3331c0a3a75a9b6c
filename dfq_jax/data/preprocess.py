"""Image decoding, torchvision-equivalent test preprocessing, normalisation constants.

Everything here works on host numpy uint8 images in NHWC (HWC per image) layout, except
`normalize`, which also accepts a jax array (the evaluator normalises on device).

Preprocessing modes (the test transforms of the GDFQ/AdaDFQ/DSG code, methods.md §1):
  'cifar':    no resize; every image must already be `image_size` (32x32 for CIFAR).
              A wrong size is an error, never silently resized.
  'imagenet': torchvision `Resize(256)` (shorter side to 256, the longer one
              `int(256 * long / short)`, PIL bilinear, which always antialiases) then
              `CenterCrop(224)` (offsets `int(round((size - 224) / 2))`, Python's round,
              i.e. half-to-even). Images smaller than the crop are zero-padded the way
              torchvision's `center_crop` pads (never happens after Resize(256)).
Both modes decode with PIL `Image.open(f).convert('RGB')` like torchvision's `pil_loader`
(grayscale, palette, CMYK and RGBA become RGB; EXIF orientation is ignored, as there).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

PREPROCESSING_MODES = ("cifar", "imagenet")


# --------------------------------------------------------------------------------------
# Containers and normalisation constants
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageDataset:
  """A decoded evaluation set held in host memory.

  Attributes:
    images: uint8 [N, H, W, 3], RGB, NHWC, not normalised.
    labels: int32 [N].
    class_names: name of each label index (len == number of classes).
    name: a short description, e.g. 'imagefolder:<root>/test (cifar)' or 'tfds:cifar10/test'.
    files: for folder sources, the source file of each image (same order), else None.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  name: str = ""
  files: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(
        f"ImageDataset.images must be uint8 [N, H, W, 3]; got "
        f"{self.images.dtype} {self.images.shape}."
      )
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(
        f"ImageDataset.labels must be [N={self.images.shape[0]}]; got {self.labels.shape}."
      )
    self.labels = self.labels.astype(np.int32, copy=False)
    self.class_names = tuple(self.class_names)

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def take(self, n: int) -> "ImageDataset":
    """The first n examples."""
    files = None if self.files is None else self.files[:n]
    return ImageDataset(self.images[:n], self.labels[:n], self.class_names, self.name, files)


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel (RGB) mean and std on the [0, 1] scale: x = (u8 / 255 - mean) / std."""

  mean: tuple[float, float, float]
  std: tuple[float, float, float]


CIFAR10_NORM = Normalization(
  (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)
)
CIFAR100_NORM = Normalization(
  (0.50705882, 0.48666667, 0.44078431), (0.26745098, 0.25568627, 0.27607843)
)
IMAGENET_NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# Named presets: by dataset, and by model where a model's training code used other
# constants than its dataset's (the akamaster CIFAR ResNets use the ImageNet constants).
NORMALIZATION_PRESETS: dict[str, Normalization] = {
  "cifar10": CIFAR10_NORM,
  "cifar100": CIFAR100_NORM,
  "imagenet": IMAGENET_NORM,
  "imagenet2012": IMAGENET_NORM,
  # pytorchcv CIFAR models as evaluated by GDFQ/AdaDFQ/DSG (their dataloader.py).
  "pytorchcv_cifar10": CIFAR10_NORM,
  "pytorchcv_cifar100": CIFAR100_NORM,
  # akamaster/pytorch_resnet_cifar10 (trainer.py normalises CIFAR with ImageNet constants).
  "akamaster_cifar10": IMAGENET_NORM,
  "akamaster_resnet20": IMAGENET_NORM,
}


def get_normalization(name: str) -> Normalization:
  """Looks up a preset of NORMALIZATION_PRESETS by name (case-insensitive)."""
  key = name.lower()
  if key not in NORMALIZATION_PRESETS:
    raise KeyError(
      f"Unknown normalisation preset {name!r}; known presets: {sorted(NORMALIZATION_PRESETS)}."
    )
  return NORMALIZATION_PRESETS[key]


def normalize(images_uint8: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
  """uint8 [..., 3] images -> float32 (images / 255 - mean) / std.

  Same op order as torchvision ToTensor + Normalize (divide by 255, subtract, divide).
  numpy in -> numpy out; a jax array (or a tracer) in -> jax array out.
  """
  if isinstance(images_uint8, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp  # imported on use
  if images_uint8.dtype != np.uint8:
    raise TypeError(
      f"normalize expects uint8 images (0..255); got {images_uint8.dtype}. "
      "Float images are probably normalised already."
    )
  if images_uint8.shape[-1] != 3:
    raise ValueError(
      f"normalize expects channels-last RGB images [..., 3]; got shape {tuple(images_uint8.shape)}."
    )
  mean = xp.asarray(mean, dtype=np.float32)
  std = xp.asarray(std, dtype=np.float32)
  if mean.shape != (3,) or std.shape != (3,):
    raise ValueError(f"mean and std must have 3 values (RGB); got {mean.shape}, {std.shape}.")
  x = images_uint8.astype(np.float32) / np.float32(255.0)
  return (x - mean) / std


# --------------------------------------------------------------------------------------
# torchvision-equivalent geometry
# --------------------------------------------------------------------------------------


def resize_shorter_size(width: int, height: int, size: int) -> tuple[int, int]:
  """torchvision Resize(int) output (width, height): shorter side -> size, longer side
  int(size * long / short) (float division, truncated)."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_offsets(width: int, height: int, crop: int) -> tuple[int, int]:
  """torchvision center_crop (left, top) for an image at least crop x crop:
  int(round((size - crop) / 2.0)) with Python's half-to-even round."""
  return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def _pad_for_crop(img: Image.Image, crop: int) -> Image.Image:
  """torchvision center_crop's zero padding when the image is smaller than the crop."""
  w, h = img.size
  if w >= crop and h >= crop:
    return img
  left = (crop - w) // 2 if crop > w else 0
  top = (crop - h) // 2 if crop > h else 0
  right = (crop - w + 1) // 2 if crop > w else 0
  bottom = (crop - h + 1) // 2 if crop > h else 0
  out = Image.new(img.mode, (w + left + right, h + top + bottom), 0)
  out.paste(img, (left, top))
  return out


def imagenet_transform(
  img: Image.Image, resize_size: int = 256, crop_size: int = 224
) -> Image.Image:
  """Resize(resize_size) + CenterCrop(crop_size) exactly as torchvision does on PIL."""
  w, h = img.size
  new_w, new_h = resize_shorter_size(w, h, resize_size)
  if (new_w, new_h) != (w, h):
    img = img.resize((new_w, new_h), Image.BILINEAR)
  img = _pad_for_crop(img, crop_size)
  w, h = img.size
  if (w, h) == (crop_size, crop_size):
    return img
  left, top = center_crop_offsets(w, h, crop_size)
  return img.crop((left, top, left + crop_size, top + crop_size))


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """A preprocessing mode with its sizes; `output_shape` is (H, W, 3) of every image."""

  mode: str = "cifar"
  image_size: int = 32  # 'cifar': required input size (square).
  resize_size: int = 256  # 'imagenet': Resize(resize_size).
  crop_size: int = 224  # 'imagenet': CenterCrop(crop_size).

  def __post_init__(self):
    if self.mode not in PREPROCESSING_MODES:
      raise ValueError(
        f"preprocessing mode must be one of {PREPROCESSING_MODES}; got {self.mode!r}."
      )

  @property
  def output_shape(self) -> tuple[int, int, int]:
    s = self.image_size if self.mode == "cifar" else self.crop_size
    return (s, s, 3)

  def key(self) -> str:
    if self.mode == "cifar":
      return f"cifar{self.image_size}"
    return f"imagenet{self.resize_size}-{self.crop_size}"


def as_preprocessing(p: "str | Preprocessing | Mapping[str, Any]") -> Preprocessing:
  if isinstance(p, Preprocessing):
    return p
  if isinstance(p, str):
    return Preprocessing(p)
  return Preprocessing(**dict(p))


def decode_image(
  source: "str | os.PathLike | bytes", preprocessing: "str | Preprocessing", what: str | None = None
) -> np.ndarray:
  """Decodes one image file (path) or encoded bytes to uint8 [H, W, 3] after preprocessing.

  Args:
    source: a file path, or the encoded bytes (JPEG/PNG/...).
    preprocessing: 'cifar', 'imagenet' or a Preprocessing.
    what: how to name the image in errors (defaults to the path).
  Raises:
    ValueError naming the image if it cannot be decoded, or (mode 'cifar') is not
    image_size x image_size.
  """
  p = as_preprocessing(preprocessing)
  if what is None:
    what = os.fspath(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>"
  try:
    fobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    with fobj:
      img = Image.open(fobj)
      img = img.convert("RGB")  # forces the full decode while the file is open
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot decode image {what}: {type(e).__name__}: {e}") from e
  if p.mode == "cifar":
    if img.size != (p.image_size, p.image_size):
      raise ValueError(
        f"Image {what} is {img.size[0]}x{img.size[1]} (WxH), but preprocessing 'cifar' "
        f"expects every image to be {p.image_size}x{p.image_size}. Use "
        "preprocessing='imagenet' (Resize+CenterCrop) for larger images, or set "
        "image_size."
      )
  else:
    img = imagenet_transform(img, p.resize_size, p.crop_size)
  return np.asarray(img, dtype=np.uint8)
