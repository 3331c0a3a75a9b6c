"""A stand-in for TFDS's catalog `cifar10` builder that packs local JPEG files.

Same name ('cifar10', from this module's name), version (3.0.2), splits and features
(id, image 32x32x3, label with the 10 CIFAR-10 names) as the catalog builder, so the data it
writes is read back by `tfds.builder('cifar10', data_dir=...)`, the catalog class.
`SOURCE` ({split: [(path, label), ...]}) must be set before download_and_prepare. Not
registered (skip_registration): it would clash with the catalog's cifar10.
"""

import tensorflow_datasets as tfds

CLASS_NAMES = [
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
]


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("3.0.2")
  SOURCE: dict = {}

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(items) for split, items in self.SOURCE.items()}

  def _generate_examples(self, items):
    for i, (path, label) in enumerate(items):
      # A path makes TFDS store the file's bytes unchanged (here JPEG).
      yield f"{i:06d}", {"id": f"{i:06d}", "image": path, "label": label}
