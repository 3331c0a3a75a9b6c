r"""The embedded default: offline, a few minutes on 2 CPU cores, no downloads.

  python -m dfq_jax.main                       # same as:
  python -m dfq_jax.main --config configs/demo.py --workdir runs/demo

A CIFAR ResNet-8 teacher is trained in seconds on scikit-learn's digits (shipped inside
the package; 16x16 RGB here), then quantized to W2A2 with no data by the chosen method
(default gdfq; demo.py:adadfq or :dsg work too, and any bits, e.g. demo.py:gdfq,w4a4) and
evaluated on the 359 held-out digits. Prints a table of FP / quantized-before /
quantized-after accuracy.

Why W2A2: this small teacher loses almost nothing at W4A4 without training (measured,
600 iterations of gdfq: FP 99.72, W4A4 before 99.44, after 99.72; W3A3 97.49 -> 99.16),
so the method has nothing to show there. At W2A2 the no-training floor is 66.30 and
600 data-free iterations lift it to 75.77 (best 76.32), in about 100 s on 2 cores.
"""

from dfq_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  config.method = "gdfq"
  config.quant.w_bits = config.quant.a_bits = 2  # a bits argument overrides
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
