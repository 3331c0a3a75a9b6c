r"""CIFAR-10 ResNet-20: GDFQ, DSG, AdaDFQ (QAT), the eval floor, and PTQ.

Run (the akamaster teacher shipped in ../shared; JPEG CIFAR-10 test set):

  python -m dfq_jax.main --config configs/cifar10_resnet20.py:adadfq,w4a4 \
    --workdir runs/c10_adadfq_w4a4 \
    --config.teacher.weights=../shared/models/resnet20_cifar10_akamaster.th \
    --config.data.root=../shared/data/cifar10-jpeg

Arguments after ':': method (gdfq | dsg | adadfq | eval | zeroq_ptq | dsg_ptq: data-free
post-training quantization, measured in the README), bits (w3a3, w4a4, w5a5, w8a8,
...), 'parity', and teacher=akamaster (default; option-A shortcuts, ImageNet
normalisation) or teacher=pytorchcv (resnet20_cifar10, the papers' teacher: option-B
shortcuts, CIFAR normalisation).

Paper hyperparameters (methods.md §3, §5.2): 400 epochs x 200 iterations; GDFQ batch 200,
AdaDFQ batch 16; lr_Q 1e-4, lr_G 1e-3, milestones [100, 200, 300]; warm-up 4 epochs.
DSG has no CIFAR setting in its papers: it uses GDFQ's.
Reported top-1 with the pytorchcv teacher (FP 93.89; AdaDFQ Table 2):
  GDFQ   W3A3 75.11, W4A4 90.11, W5A5 93.38
  AdaDFQ W3A3 84.89, W4A4 92.31, W5A5 93.81
The akamaster teacher reaches 81.03 % on the JPEG test set (91.78 % on the original).
"""

from dfq_jax import config_base


def get_config(arg=None):
  config = config_base.base_config()
  flags, kv = config_base.parse_arg(arg)
  config_base.apply_flags(config, flags)
  teacher = kv.pop("teacher", "akamaster")
  if kv:
    raise ValueError(f"unknown config arguments {sorted(kv)}: this file takes teacher=.")
  config.num_classes = 10
  config.data.name = "cifar10"
  if teacher == "akamaster":
    config.teacher.shortcut, config.teacher.layout = "A", "akamaster"
    config.data.normalization = "imagenet"
  elif teacher == "pytorchcv":
    config.teacher.shortcut, config.teacher.layout = "B", "pytorchcv"
    config.data.normalization = "cifar10"
  else:
    raise ValueError(f"teacher={teacher!r} is unknown: use akamaster or pytorchcv.")
  config.batch_size = 16 if config.method == "adadfq" else 200
  return config
