r"""ImageNet ResNet-50 (pytorchcv resnet50, stride on the bottleneck's 1x1 conv).

  python -m dfq_jax.main --config configs/imagenet_resnet50.py:adadfq,w4a4 \
    --workdir runs/r50_adadfq_w4a4 --config.teacher.weights=resnet50-*.pth \
    --config.data.data_dir=~/tensorflow_datasets

Paper hyperparameters (methods.md §3, §5.2): batch 16, 400 x 200; GDFQ/DSG lr_Q 1e-6,
milestones [100, 200, 300], warm-up 50; AdaDFQ lr_Q 1e-4, milestones [150, 300, 400]
(code comment: [200, 300, 400] at 4 bits, [350, 400] at 5 bits), warm-up 100 (50 at
4/5 bits), T = 5, lambda_l 0.4 (0.3 at 4/5 bits), alpha_ds 0.2 (0.1 at 4 bits).
Data-free PTQ: `:dsg_ptq,w4a4` / `:zeroq_ptq,w4a4`; DSG README's DSG-PTQ (FP 77.72):
W4A4 56.12 (re-run 56.36), W6A6 76.90, W8A8 77.72.
For torchvision weights use --config.teacher.model=resnet50_torchvision
--config.teacher.layout=torchvision.
Reported top-1 (FP 77.73): GDFQ W4A4 54.16; DSG-QAT W4A4 71.96; AdaDFQ W3A3 17.63,
W4A4 68.38, W5A5 76.03.
"""

from dfq_jax import config_base


def _gdfq(config):
  config.student.lr = 1e-6
  config.warmup_epochs = 50


def _adadfq(config):
  bits = config_base.bits_of(config)
  config.student.lr = 1e-4
  config.student.milestones = config.generator.milestones = {4: (200, 300, 400), 5: (350, 400)}.get(
    bits, (150, 300, 400)
  )
  config.warmup_epochs = 50 if bits in (4, 5) else 100
  config.adadfq.temperature = 5.0
  config.adadfq.lambda_l = 0.3 if bits in (4, 5) else 0.4
  config.adadfq.alpha_ds = 0.1 if bits == 4 else 0.2


def get_config(arg=None):
  return config_base.paper_config(
    arg,
    dataset="imagenet2012",
    model="resnet50",
    layout="pytorchcv",
    method_defaults={"gdfq": _gdfq, "dsg": _gdfq, "adadfq": _adadfq},
  )
