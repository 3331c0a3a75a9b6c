"""Shared defaults of every dfq_jax config file (configs/*.py) and its argument parser.

A config file's `get_config(arg)` calls `base_config()`, then `apply_args(config, arg)`
with its own dataset/model/paper defaults. Arguments after `:`:
  method:  gdfq | dsg | adadfq | eval | dsg_ptq | zeroq_ptq
  bits:    wXaY (X, Y in 2..8), e.g. w4a4, w3a3, w8a8
  parity   reproduce the original code's quirks (methods.md §7): sets the keys of `PARITY`
  key=value  any other top-level string argument known to the file (e.g. teacher=pytorchcv)
Everything is also overridable on the command line: --config.key=value.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys

import ml_collections

METHODS = ("gdfq", "dsg", "adadfq", "eval", "dsg_ptq", "zeroq_ptq")
PTQ_METHODS = ("dsg_ptq", "zeroq_ptq")
_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")

# What `parity` changes, all in one place: the original codes' quirks as plain keys
# (methods.md §7). The ':parity' config argument sets them; each can still be overridden.
PARITY = {
  "quant.range_mode": "bias_corrected",  # the default too
  "eval_every_steps": 0,  # every epoch, as the original (reports the best)
  "student_forward": "separate",  # AdaDFQ: the original's two student forwards
  "gdfq.kd_reduction": "elementwise_mean",  # nn.KLDivLoss's default mean over B*C
  "dsg.sda_form": "batch",  # the QAT code's batch-level slack...
  "dsg.two_sided": True,  # ... two-sided |(|gap| - m)|
  "dsg.lse": "channel",  # ... its channel "LSE"
  "dsg.sci": "logged",  # ... and SCI without gradient
}

# The original codes' data-free PTQ settings (ZeroQ `distill_data.py`; DSG
# `post_training_quantization/distill_data.py`), set by ':zeroq_ptq' / ':dsg_ptq'.
PTQ_PRESETS = {
  "zeroq_ptq": dict(
    lr=0.5,
    plateau_patience=100,
    slack=False,
    lse="off",
    sci="off",
    ce_weight=0.0,
    tv_weight=0.0,
    l2_weight=0.0,
    jitter=0,
    batch_size=32,
    init="zeroq",
  ),
  "dsg_ptq": dict(
    lr=0.9,
    plateau_patience=260,
    slack=True,
    lse="diagonal",
    sci="logged",
    ce_weight=2.0,
    tv_weight=0.01,
    l2_weight=0.01,
    jitter=30,
  ),
}

# Keys renamed in this version: {old: new} (an override of the old key is refused by name).
RENAMED_KEYS = {"generator.dtype": "compute_dtype"}

# Values renamed when parity moved into plain keys: {key: {old: new}}.
RENAMED_VALUES = {
  "quant.range_mode": {"parity": "bias_corrected"},
  "dsg.lse": {"sample": "modulo"},
  "ptq.lse": {"ptq": "diagonal"},
}


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all configs (the CIFAR ResNet-20 GDFQ-family settings)."""
  c = ml_collections.ConfigDict()
  c.method = "gdfq"
  c.seed = 0
  c.parity = False  # set by the ':parity' argument with the keys it changes (PARITY)
  c.num_classes = 10
  c.image_size = 32
  c.channels = 3
  _add_teacher_and_data(c)
  _add_quantization(c)
  _add_ptq(c)
  _add_networks(c)
  _add_schedule(c)
  _add_methods(c)
  return c


def _add_teacher_and_data(c: ml_collections.ConfigDict) -> None:
  """The teacher network and the real evaluation data."""
  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "resnet20_cifar"
  c.teacher.shortcut = "A"  # CIFAR ResNets: 'A' akamaster, 'B' pytorchcv
  c.teacher.weights = ""  # PyTorch checkpoint file or converted orbax directory
  c.teacher.layout = "akamaster"  # akamaster | pytorchcv | torchvision | demo

  c.data = ml_collections.ConfigDict()
  c.data.source = "imagefolder"  # imagefolder | tfds | digits
  c.data.root = ""  # imagefolder: <root>/<split>/<class>/*.jpg
  c.data.data_dir = ""  # tfds: prepared datasets directory
  c.data.name = "cifar10"  # tfds dataset name
  c.data.download = False  # tfds: allow download_and_prepare when data is missing
  c.data.split = "test"
  c.data.preprocessing = "cifar"  # cifar (fixed size) | imagenet (resize 256, crop 224)
  c.data.normalization = "imagenet"  # preset name of mean/std (the model's training one)
  c.data.cache_dir = ""  # where decoded arrays may be cached ('' = no cache)
  c.data.limit = 0  # evaluate on the first N images only (0 = all)
  c.data.eval_batch_size = 500


def _add_quantization(c: ml_collections.ConfigDict) -> None:
  """The student's quantizer and the no-training floor's range calibration."""
  c.quant = ml_collections.ConfigDict()
  c.quant.w_bits = 4
  c.quant.a_bits = 4
  c.quant.first_bits = 0  # 0 = same as w_bits (GDFQ family); 8 = BRECQ style
  c.quant.last_bits = 0
  c.quant.rules = ""  # "regex=wXaY;regex2=w8" per-layer overrides (32 = FP)
  c.quant.weight_mode = "asymmetric"  # asymmetric (per-channel min/max, the papers') |
  # symmetric (zero point 0: int8 engines)
  c.quant.deploy = False  # the int8-engine deployment quantizer (needs symmetric weights;
  # config argument 'deploy' sets both): also quantizes the input, the conv outputs that meet
  # a residual sum and the pooled features, so the ONNX export runs integer kernels
  c.quant.deploy_bits = 8  # bit-width of those extra quantizers
  c.quant.range_mode = "bias_corrected"  # bias_corrected (the GDFQ-family EMA) | ema |
  # minmax

  # Data-free mixed precision (quant/mixed.py): per-layer bit-widths chosen by a
  # sensitivity on synthetic images, then used as quant.rules by every method.
  c.quant.mixed = ml_collections.ConfigDict()
  c.quant.mixed.budget_w_bits = 0.0  # average weight bits over all kernel elements (0 =
  # uniform w_bits); quant.rules/first_bits/last_bits pin layers
  c.quant.mixed.budget_a_bits = 0.0  # average activation bits over activation elements
  # (0 = uniform a_bits)
  c.quant.mixed.w_candidates = "2,3,4,5,6,8"  # weight bit-widths a layer may get
  c.quant.mixed.a_candidates = "2,3,4,5,6,8"  # activation bit-widths a QuantAct may get
  c.quant.mixed.source = "dsg"  # images of the sensitivity: dsg | zeroq (synthesised with
  # that PTQ preset and ptq.steps) | noise | real (calib.split: a reference, not data-free)
  c.quant.mixed.images = 64  # how many
  c.quant.mixed.image_sets = 1  # independent sets of `images` images whose sensitivities
  # are averaged (set j of seed s = a one-set run of seed s * image_sets + j); 3 measured,
  # not better at W3 (README)
  c.quant.mixed.refine = 4  # rounds of a local search on the whole network's KL after the
  # exact solve (sensitivities re-measured around the allocation propose moves; the best
  # measured one is taken while the KL falls); 0 = the one-shot ZeroQ allocation.
  # W3, seeds 0-6: 74.33 +- 1.40 against 73.28 one-shot, uniform 68.62 (README)
  c.quant.mixed.refine_holdout = True  # take a move only if it also lowers the KL on a
  # held-out set of `images` more images of the source (one more synthesis): on the
  # search images alone the KL fell further than the network improved (README)
  c.quant.mixed.samples_path = ""  # a synthetic.npz (e.g. of a PTQ run) instead of source
  c.quant.mixed.sensitivity_path = ""  # another run's mixed_precision.json: reuse its
  # sensitivities (the same teacher), e.g. to try other budgets

  # Activation-range calibration of the no-training floor (method eval, and
  # quant_top1_before of the training methods).
  c.calib = ml_collections.ConfigDict()
  c.calib.source = "noise"  # noise (N(0,1) images: data-free) | real (real images)
  c.calib.split = "train"  # real calibration images come from this split
  c.calib.batch_size = 256
  c.calib.batches = 1
  c.calib.method = "minmax"  # activation-range observer: minmax | sample_mean |
  # percentile | mse (methods.md §4.1; PTQ calibrates
  # on its synthetic set with it)
  c.calib.percentile = 99.999  # observer 'percentile': upper percentile


def _add_ptq(c: ml_collections.ConfigDict) -> None:
  """Data-free PTQ (methods dsg_ptq, zeroq_ptq)."""
  # Data-free PTQ (methods dsg_ptq, zeroq_ptq; dfq_jax/ptq/synthesis.py): images optimised
  # through the teacher, then the student's ranges calibrated on them (no fine-tuning).
  # ':dsg_ptq' / ':zeroq_ptq' set the original codes' values (PTQ_PRESETS).
  c.ptq = ml_collections.ConfigDict()
  c.ptq.objective = ""  # set by the method argument; must equal the method
  c.ptq.steps = 500
  c.ptq.lr = 0.9
  c.ptq.plateau_patience = 260
  c.ptq.min_lr = 1e-4
  c.ptq.batch_size = 64  # images per optimised batch (DSG README: 64)
  c.ptq.batches = 1
  c.ptq.init = "uniform"  # uniform (U[0,1), the codes) | normal
  c.ptq.slack = True  # DSG slack margins (False: ZeroQ, no margin)
  c.ptq.margin_percentile = 30.0
  c.ptq.lse = "diagonal"  # off | diagonal (code: sample b -> layer b, b < L) |
  # modulo (sample b -> layer b mod L)
  c.ptq.lse_factor = 2.0
  c.ptq.sci = "logged"  # off | differentiable | logged (code: no gradient)
  c.ptq.sci_weight = 0.0  # 0 = 1/L
  c.ptq.ce_weight = 2.0  # the DSG code adds CE twice
  c.ptq.tv_weight = 0.01
  c.ptq.l2_weight = 0.01
  c.ptq.jitter = 30
  c.ptq.input_prior = True
  c.ptq.samples_path = ""  # reuse a synthetic.npz instead of synthesising
  c.ptq.log_every_steps = 100
  c.ptq.diagnose_real = True  # diversity diagnostics of as many real images too


def _add_networks(c: ml_collections.ConfigDict) -> None:
  """The generator and the student optimisers."""
  c.generator = ml_collections.ConfigDict()
  c.generator.name = "cifar"
  c.generator.latent_dim = 100
  c.generator.width = 128
  c.generator.bn_eps = 0.8  # original-code slip (eps, not momentum); 1e-5 intended
  c.generator.conv_impl = "subpixel"  # subpixel (exact GEMM forms of the 3 convs with
  # fast custom backwards) | standard; same params
  c.generator.lr = 1e-3
  c.generator.b1 = 0.5
  c.generator.b2 = 0.999
  c.generator.milestones = (100, 200, 300)  # epochs; lr x0.1 at each

  c.student = ml_collections.ConfigDict()
  c.student.lr = 1e-4
  c.student.momentum = 0.9
  c.student.nesterov = True
  c.student.weight_decay = 1e-4
  c.student.milestones = (100, 200, 300)


def _add_schedule(c: ml_collections.ConfigDict) -> None:
  """Batch, forward strategy, schedule, logging and checkpoints."""
  c.batch_size = 16  # global batch, split over all devices
  c.student_forward = "shared"  # AdaDFQ after the range freeze: one student forward for
  # both steps | separate (two, as while ranges update)
  c.stats_scope = "global"  # global (sync-BN, device-count independent) | per_device
  c.compute_dtype = "float32"  # convs and matmuls of teacher, student and generator:
  # float32 | bfloat16 (float32 accumulation); BN statistics,
  # losses, softmax/entropy, activation ranges, fake-quant
  # arithmetic and optimizer states stay float32
  c.cpu_conv_kernels = "eigen"  # XLA:CPU convs: eigen (faster here) | ynn (XLA default)
  c.epochs = 400
  c.iters_per_epoch = 200
  c.total_steps = 0  # 0 = epochs * iters_per_epoch; else schedule scaled
  c.warmup_epochs = 4  # student frozen (generator only)
  c.range_update_epochs = 4  # activation ranges update, then freeze (training then
  # quantizes with the stored ranges; = epochs: never)
  c.min_phase_steps = 200  # floor on warm-up and range updates in shortened runs

  c.log_every_steps = 50
  c.eval_every_steps = 1000  # evaluation of the student on the real eval set (0 =
  # every epoch of iters_per_epoch, as the original)
  c.ckpt_every_steps = 500
  c.sample_every_steps = 1000  # PNG grids of generated samples (0 = never)
  c.keep_checkpoints = 3


def _add_methods(c: ml_collections.ConfigDict) -> None:
  """Per-method hyperparameters (the papers' values)."""
  c.gdfq = ml_collections.ConfigDict()
  c.gdfq.bns_weight = 0.1
  c.gdfq.kd_temperature = 20.0
  c.gdfq.kd_alpha = 1.0
  c.gdfq.kd_reduction = "batchmean"  # batchmean | elementwise_mean (nn.KLDivLoss default)

  c.dsg = ml_collections.ConfigDict()
  c.dsg.sda_weight = 0.1
  c.dsg.margin_percentile = 30.0
  c.dsg.sda_form = "sample"  # sample (per-sample slack, paper) | batch (QAT code)
  c.dsg.two_sided = False  # batch form: True = QAT code |(|gap|-m)|
  c.dsg.lse = "modulo"  # modulo (sample b -> layer b mod L) | channel (QAT
  # code, batch form only) | off
  c.dsg.lse_factor = 2.0
  c.dsg.sci = "differentiable"  # differentiable | logged (no gradient, QAT code) | off
  c.dsg.sci_weight = 0.0  # 0 = 1/L (the code's weight)

  c.adadfq = ml_collections.ConfigDict()
  c.adadfq.lambda_l = 0.1
  c.adadfq.lambda_u = 0.8
  c.adadfq.alpha_ds = 0.2
  c.adadfq.alpha_as = 0.1
  c.adadfq.beta = 1.0
  c.adadfq.gamma = 1.0
  c.adadfq.temperature = 20.0


def key_docs() -> dict[str, str]:
  """{'quant.w_bits': 'its one-line comment', ...} from the comments in `base_config`."""
  docs, last = {}, None
  for line in inspect.getsource(sys.modules[__name__]).splitlines():
    m = re.match(r"^\s*c\.([\w.]+)\s*=.*?#\s*(.*)$", line)
    if m:
      last = m.group(1)
      docs[last] = m.group(2).strip()
    elif last and re.match(r"^\s+#\s*(.*)$", line) and "=" not in line.split("#")[0]:
      docs[last] += " " + line.split("#", 1)[1].strip()  # a comment continued below
    else:
      last = None
  return docs


def describe(config: ml_collections.ConfigDict) -> str:
  """Every key of `config`, its value and (where base_config has one) its comment."""
  docs = key_docs()
  lines = []

  def walk(node, prefix):
    for key in sorted(node.keys()):
      value = node[key]
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, name + ".")
      else:
        doc = docs.get(name, "")
        lines.append(f"{name} = {value!r}" + (f"    # {doc}" if doc else ""))

  walk(config, "")
  return "\n".join(lines)


def parse_arg(arg: str | None) -> tuple[list[str], dict[str, str]]:
  """Splits 'adadfq,w4a4,teacher=pytorchcv' into (['adadfq', 'w4a4'], {'teacher': ...})."""
  flags, kv = [], {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      kv[k.strip()] = v.strip()
    else:
      flags.append(part)
  return flags, kv


def apply_flags(config: ml_collections.ConfigDict, flags: list[str]) -> None:
  """Applies method / bits / parity flags in place; raises on an unknown flag."""
  for flag in flags:
    m = _BITS_RE.match(flag)
    if flag in METHODS:
      config.method = flag
    elif m:
      config.quant.w_bits, config.quant.a_bits = int(m.group(1)), int(m.group(2))
    elif flag == "parity":
      apply_parity(config)
    elif flag == "deploy":
      config.quant.deploy, config.quant.weight_mode = True, "symmetric"
    else:
      raise ValueError(
        f"config argument {flag!r} is unknown: use a method ({', '.join(METHODS)}), "
        "bits like w4a4, 'parity', 'deploy', or key=value."
      )
  if config.method in PTQ_METHODS:
    apply_ptq_preset(config, config.method)


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def apply_parity(config: ml_collections.ConfigDict) -> None:
  """Sets every key of `PARITY` (the original codes' quirks) and marks config.parity."""
  config.parity = True
  for key, value in PARITY.items():
    _set(config, key, value)


def check_config_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for an old value spelling, or parity set without its keys."""
  for key, renames in RENAMED_VALUES.items():
    value = _get(config, key)
    if value in renames:
      raise ValueError(
        f"{key}={value!r} is now called {renames[value]!r}: pass --config.{key}={renames[value]}."
      )
  defaults = base_config()
  # The keys no config file sets (eval_every_steps is a file's choice, e.g. the demo's).
  changed = [k for k, v in PARITY.items() if _get(defaults, k) != v and k != "eval_every_steps"]
  if config.parity and all(_get(config, k) == _get(defaults, k) for k in changed):
    raise ValueError(
      "parity=True was set without the keys it changes: select parity with the config "
      "argument (e.g. configs/cifar10_resnet20.py:adadfq,w4a4,parity), not with "
      "--config.parity."
    )


def from_saved(values: dict) -> ml_collections.ConfigDict:
  """A run's config from its config.json: the saved values over today's defaults (keys
  added since keep their default, keys since removed are dropped, old value spellings and
  an old-style `parity=True` are translated)."""
  config = base_config()

  def merge(node, saved):
    for key, value in saved.items():
      if key not in node:
        continue
      if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
        merge(node[key], value)
      else:
        node[key] = tuple(value) if isinstance(value, list) else value

  merge(config, values)
  for key, renames in RENAMED_VALUES.items():  # spellings of earlier versions
    if _get(config, key) in renames:
      _set(config, key, renames[_get(config, key)])
  old_parity = values.get("parity") and "sda_form" not in values.get("dsg", {})
  if old_parity:  # saved before parity became plain keys: it meant all of them
    apply_parity(config)  # (its cadence too: parity evaluated every epoch)
  return config


def with_flags(config: ml_collections.ConfigDict, flags: list[str]) -> ml_collections.ConfigDict:
  """A copy of `config` with config-argument flags (method, bits, parity) applied."""
  c = copy.deepcopy(config)
  with c.unlocked():
    apply_flags(c, flags)
  return c


def apply_ptq_preset(config: ml_collections.ConfigDict, method: str) -> None:
  """Sets config.ptq to the original code's settings of `method` (dsg_ptq | zeroq_ptq)."""
  config.ptq.objective = method
  for key, value in PTQ_PRESETS[method].items():
    config.ptq[key] = value
  # The DSG code calibrates with per-sample ranges averaged ('ema'); ZeroQ with min/max.
  config.calib.method = "sample_mean" if method == "dsg_ptq" else "minmax"


def paper_config(
  arg,
  *,
  dataset: str,
  model: str,
  layout: str,
  shortcut: str = "A",
  method_defaults=None,
  allowed_kv=(),
) -> ml_collections.ConfigDict:
  """A config for one dataset/model with the papers' per-method hyperparameters.

  Args:
    arg: the ':' argument string of the config file.
    dataset: 'cifar10', 'cifar100' or 'imagenet2012'.
    model: teacher model name (dfq_jax.models.MODELS).
    layout: PyTorch layout of the teacher's checkpoint.
    shortcut: CIFAR ResNets only.
    method_defaults: {method: fn(config)} applied after the method and bits are known.
    allowed_kv: names of key=value arguments the calling file handles itself; any other
      key=value argument is an error.
  """
  config = base_config()
  flags, kv = parse_arg(arg)
  apply_flags(config, flags)
  unknown = sorted(set(kv) - set(allowed_kv))
  if unknown:
    raise ValueError(f"unknown config arguments {unknown}.")
  config.teacher.model, config.teacher.layout, config.teacher.shortcut = model, layout, shortcut
  config.data.name = dataset
  if dataset == "imagenet2012":
    config.num_classes, config.image_size = 1000, 224
    config.data.source, config.data.split = "tfds", "validation"
    config.data.preprocessing, config.data.normalization = "imagenet", "imagenet"
    config.data.eval_batch_size = 100
    config.generator.name = "imagenet"
    config.calib.batch_size = 32
  else:
    config.num_classes = 100 if dataset == "cifar100" else 10
    config.data.normalization = dataset
  if method_defaults and config.method in method_defaults:
    method_defaults[config.method](config)
  return config


def bits_of(config) -> int:
  """The (weight) bit-width a paper setting is chosen by."""
  return int(config.quant.w_bits)
