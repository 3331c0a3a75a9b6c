r"""The embedded default: offline, a few minutes on 2 CPU cores, no downloads.

  python -m dfq_jax.main                       # same as:
  python -m dfq_jax.main --config configs/demo.py --workdir runs/demo

A CIFAR ResNet-8 teacher is trained in seconds on scikit-learn's digits (shipped inside
the package; 16x16 RGB here), then quantized to W4A4 with no data by the chosen method
(default gdfq; demo.py:adadfq or :dsg work too) and evaluated on the 359 held-out digits.
Prints a table of FP / quantized-before / quantized-after accuracy.
"""

from dfq_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  config.method = "gdfq"
  flags, kv = config_base.parse_arg(arg)
  config_base.apply_flags(config, flags)
  if kv:
    raise ValueError(f"unknown config arguments {sorted(kv)}: demo.py takes method and bits.")
  config.num_classes = 10
  config.image_size = 16
  config.teacher.model = "resnet8_cifar"
  config.teacher.shortcut = "A"
  config.teacher.layout = "demo"
  config.data.source = "digits"
  config.data.split = "test"
  config.calib.batch_size = 128
  config.batch_size = 32
  config.total_steps = 600
  config.log_every_steps = 20
  config.eval_every_steps = 100
  config.ckpt_every_steps = 200
  config.sample_every_steps = 200
  config.student.lr = 1e-3
  return config
