r"""ImageNet MobileNetV2 (pytorchcv mobilenetv2_w1): GDFQ, DSG, AdaDFQ.

  python -m dfq_jax.main --config configs/imagenet_mobilenetv2.py:adadfq,w4a4 \
    --workdir runs/mbv2_adadfq_w4a4 --config.teacher.weights=mobilenetv2_w1-*.pth \
    --config.data.data_dir=~/tensorflow_datasets

Block outputs (no activation) stay in full precision, as in the original quantizer.
For torchvision weights: --config.teacher.model=mobilenetv2_torchvision
--config.teacher.layout=torchvision.
Paper hyperparameters (methods.md §5.2): batch 16, 400 x 200, warm-up 50; GDFQ/DSG lr_Q
1e-6, milestones [100, 200, 300]; AdaDFQ lr_Q 1e-5, milestones [350, 400], T = 5,
lambda_l 0.1, alpha_ds 0.2 (0.3 at 4 bits).
Reported top-1 (FP 73.03): GDFQ W4A4 59.43; DSG-QAT W4A4 60.46 (FP 71.88); AdaDFQ W3A3
28.99, W4A4 65.41, W5A5 71.61. Data-free PTQ: `:dsg_ptq,w4a4` / `:zeroq_ptq,w4a4` (no
DSG-PTQ number is published for MobileNetV2).
"""

from dfq_jax import config_base


def _gdfq(config):
  config.student.lr = 1e-6


def _adadfq(config):
  config.student.lr = 1e-5
  config.student.milestones = config.generator.milestones = (350, 400)
  config.adadfq.temperature = 5.0
  config.adadfq.alpha_ds = 0.3 if config_base.bits_of(config) == 4 else 0.2


def get_config(arg=None):
  config = config_base.paper_config(
    arg,
    dataset="imagenet2012",
    model="mobilenetv2",
    layout="pytorchcv",
    method_defaults={"gdfq": _gdfq, "dsg": _gdfq, "adadfq": _adadfq},
  )
  config.warmup_epochs = 50
  return config
