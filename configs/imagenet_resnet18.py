r"""ImageNet ResNet-18 (pytorchcv resnet18): GDFQ, DSG, AdaDFQ.

  python -m dfq_jax.main --config configs/imagenet_resnet18.py:adadfq,w4a4 \
    --workdir runs/r18_adadfq_w4a4 --config.teacher.weights=resnet18-*.pth \
    --config.data.data_dir=~/tensorflow_datasets     # imagenet2012 'validation'

(or --config.data.source=imagefolder --config.data.root=<dir with val/<class>/*.JPEG>
 --config.data.split=val). Paper hyperparameters (methods.md §3, §4.2, §5.2): batch 16,
400 x 200 iterations, warm-up 50 epochs; GDFQ and DSG lr_Q 1e-6, milestones [100, 200,
300]; AdaDFQ lr_Q 1e-5 and lr_G 1e-3 with milestones [350, 400], T = 5, lambda_l 0.1
(0.3 at 4/5 bits), alpha_ds 0.2 (0.3 at 5 bits).
Reported top-1 (FP 71.47): GDFQ W4A4 60.60; DSG-QAT W4A4 62.18; AdaDFQ W3A3 38.10,
W4A4 66.53, W5A5 70.29.
Data-free PTQ (no fine-tuning): `:dsg_ptq,w4a4` / `:zeroq_ptq,w4a4` (dfq_jax/ptq). DSG
README's DSG-PTQ: W4A4 39.90 (re-run 40.41), W6A6 70.46, W8A8 71.49.
"""

from dfq_jax import config_base


def _gdfq(config):
  config.student.lr = 1e-6


def _adadfq(config):
  bits = config_base.bits_of(config)
  config.student.lr = 1e-5
  config.student.milestones = config.generator.milestones = (350, 400)
  config.adadfq.temperature = 5.0
  config.adadfq.lambda_l = 0.3 if bits in (4, 5) else 0.1
  config.adadfq.alpha_ds = 0.3 if bits == 5 else 0.2


def get_config(arg=None):
  config = config_base.paper_config(
    arg,
    dataset="imagenet2012",
    model="resnet18",
    layout="pytorchcv",
    method_defaults={"gdfq": _gdfq, "dsg": _gdfq, "adadfq": _adadfq},
  )
  config.warmup_epochs = 50
  return config
