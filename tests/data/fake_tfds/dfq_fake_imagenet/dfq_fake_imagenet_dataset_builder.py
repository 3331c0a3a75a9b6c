"""A tiny ImageNet-like TFDS builder (variable image sizes, 'validation' split) that packs
local image files. `SOURCE` ({split: [(path, label), ...]}) and `CLASS_NAMES` must be set
before download_and_prepare. Not registered; read back by name from its files."""

import tensorflow_datasets as tfds


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("1.0.0")
  SOURCE: dict = {}
  CLASS_NAMES: list = []

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "file_name": tfds.features.Text(),
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=self.CLASS_NAMES),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(items) for split, items in self.SOURCE.items()}

  def _generate_examples(self, items):
    for i, (path, label) in enumerate(items):
      yield f"{i:06d}", {"file_name": str(path), "image": path, "label": label}
