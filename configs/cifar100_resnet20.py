r"""CIFAR-100 ResNet-20 (pytorchcv resnet20_cifar100, option-B shortcuts): GDFQ, DSG, AdaDFQ.

  python -m dfq_jax.main --config configs/cifar100_resnet20.py:adadfq,w4a4 \
    --workdir runs/c100_adadfq_w4a4 \
    --config.teacher.weights=resnet20_cifar100-*.pth \
    --config.data.source=tfds --config.data.data_dir=~/tensorflow_datasets

Weights: `python -m dfq_jax.models.convert --download resnet20_cifar100 ...` (pytorchcv
release; see README). Paper hyperparameters (methods.md §3, §5.2): GDFQ batch 200,
AdaDFQ batch 16, lr_Q 1e-4, milestones [100, 200, 300], warm-up 4 epochs, 400 x 200.
Reported top-1 (FP 70.33; AdaDFQ Table 2):
  GDFQ   W3A3 47.61, W4A4 63.75 (own README 63.58 +- 0.23), W5A5 67.52
  AdaDFQ W3A3 52.74, W4A4 66.81, W5A5 69.93
"""

from dfq_jax import config_base


def get_config(arg=None):
  config = config_base.paper_config(
    arg, dataset="cifar100", model="resnet20_cifar", layout="pytorchcv", shortcut="B"
  )
  config.batch_size = 16 if config.method == "adadfq" else 200
  return config
