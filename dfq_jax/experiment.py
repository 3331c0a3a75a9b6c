"""From a config to the pieces of a run: validation, teacher, student, generator, eval data.

    config -> validate_config -> build_models (teacher weights, student policy, generator)
           -> load_eval_set (real images, evaluation only)

Every check that can fail runs here, before any work, with a message that names the
problem and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from dfq_jax import config_base
from dfq_jax import demo
from dfq_jax import xla_options
from dfq_jax.data import get_normalization, load_eval_data
from dfq_jax.data.preprocess import ImageDataset, Normalization
from dfq_jax.generators import get_generator
from dfq_jax.models import MODELS, get_model
from dfq_jax.models import convert
from dfq_jax.quant import QuantPolicy
from dfq_jax.quant import numerics
from dfq_jax.trainer import Models

def parse_rules(text: str) -> tuple[tuple[str, int | None, int | None], ...]:
  """'layer1_0/conv1=w8;linear=w8a8;act2=afp' -> ((regex, w, a), ...); fp = 32."""
  rules = []
  for item in filter(None, (s.strip() for s in (text or "").split(";"))):
    if "=" not in item:
      raise ValueError(f"quant rule {item!r} must be 'regex=wXaY' (e.g. 'conv1=w8').")
    pattern, bits = item.rsplit("=", 1)
    m = re.match(r"^(?:w(\d+|fp))?(?:a(\d+|fp))?$", bits.strip())
    if not m or not (m.group(1) or m.group(2)):
      raise ValueError(f"quant rule {item!r}: bits {bits!r} must look like w8, a8, w8a8 or wfp.")
    conv = lambda g: None if g is None else (32 if g == "fp" else int(g))
    rules.append((pattern.strip(), conv(m.group(1)), conv(m.group(2))))
  return tuple(rules)


def quant_policy(config) -> QuantPolicy:
  """The student's QuantPolicy from config.quant (validated)."""
  q = config.quant
  return QuantPolicy(
      w_bits=numerics.check_bits(q.w_bits, "quant.w_bits"),
      a_bits=numerics.check_bits(q.a_bits, "quant.a_bits"),
      first_bits=q.first_bits or None, last_bits=q.last_bits or None,
      rules=parse_rules(q.rules),
      range_mode="parity" if config.parity else q.range_mode,
      axis_name="data" if config.stats_scope == "per_device" else None)


def validate_config(config) -> None:
  """Raises ValueError/FileNotFoundError for a config that cannot run, before any work."""
  if config.method not in config_base.METHODS:
    raise ValueError(f"method={config.method!r} is unknown: use one of {config_base.METHODS}.")
  quant_policy(config)
  if config.teacher.model not in MODELS:
    raise ValueError(f"teacher.model={config.teacher.model!r} is unknown: choose one of "
                     f"{sorted(MODELS)}.")
  if config.teacher.layout != "demo":
    if not config.teacher.weights:
      raise ValueError("teacher.weights is empty: pass --config.teacher.weights=PATH (a "
                       "PyTorch checkpoint or a converted orbax directory).")
    if not os.path.exists(config.teacher.weights):
      raise FileNotFoundError(f"teacher.weights={config.teacher.weights!r} does not exist.")
  if config.data.source == "imagefolder":
    if not config.data.root:
      raise ValueError("data.root is empty: pass --config.data.root=PATH "
                       "(layout <root>/<split>/<class>/*.jpg).")
    if not os.path.isdir(config.data.root):
      raise FileNotFoundError(f"data.root={config.data.root!r} is not a directory.")
  elif config.data.source == "tfds":
    if not config.data.data_dir:
      raise ValueError("data.data_dir is empty: pass --config.data.data_dir=PATH.")
  elif config.data.source != "digits":
    raise ValueError(f"data.source={config.data.source!r} is unknown: use imagefolder, "
                     "tfds or digits.")
  from dfq_jax import generators  # pylint: disable=g-import-not-at-top
  if config.generator.dtype not in generators.DTYPES:
    raise ValueError(f"generator.dtype={config.generator.dtype!r} is unknown: use one of "
                     f"{list(generators.DTYPES)}.")
  if config.generator.conv_impl not in generators.CONV_IMPLS:
    raise ValueError(f"generator.conv_impl={config.generator.conv_impl!r} is unknown: use "
                     f"one of {list(generators.CONV_IMPLS)}.")
  if config.student_forward not in ("shared", "separate"):
    raise ValueError(f"student_forward={config.student_forward!r}: use shared or separate.")
  if config.stats_scope not in ("global", "per_device"):
    raise ValueError(f"stats_scope={config.stats_scope!r}: use global or per_device.")
  xla_options.check_cpu_conv_kernels(config.cpu_conv_kernels)
  if config.calib.source not in ("noise", "real"):
    raise ValueError(f"calib.source={config.calib.source!r}: use noise or real.")
  if config.calib.method not in numerics.OBSERVERS:
    raise ValueError(f"calib.method={config.calib.method!r} is unknown: use one of "
                     f"{numerics.OBSERVERS}.")
  if not 50.0 < config.calib.percentile <= 100.0:
    raise ValueError(f"calib.percentile={config.calib.percentile} must lie in (50, 100].")
  if config.method in config_base.PTQ_METHODS:
    if config.ptq.objective != config.method:
      raise ValueError(
          f"method={config.method!r} was set without its defaults: select a PTQ method "
          f"with the config argument (e.g. configs/cifar10_resnet20.py:{config.method},w4a4)"
          ", not with --config.method.")
    from dfq_jax.ptq import synthesis  # pylint: disable=g-import-not-at-top
    synthesis.PtqHparams.from_config(config)
  for name in ("batch_size", "epochs", "iters_per_epoch"):
    if int(config[name]) <= 0:
      raise ValueError(f"{name}={config[name]} must be positive.")
  if config.total_steps < 0:
    raise ValueError(f"total_steps={config.total_steps} must be >= 0 (0 = paper schedule).")
  devices = jax.device_count()
  if config.method in ("gdfq", "dsg", "adadfq") and config.batch_size % devices:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the {devices} "
                     "devices: choose a multiple of the device count.")
  if config.method in config_base.PTQ_METHODS and config.ptq.batch_size % devices:
    raise ValueError(f"ptq.batch_size={config.ptq.batch_size} is not divisible by the "
                     f"{devices} devices: choose a multiple of the device count.")


def normalization(config) -> Normalization:
  if config.data.source == "digits":
    return demo.digits_normalization()
  return get_normalization(config.data.normalization)


def _model_kwargs(config):
  return {"shortcut": config.teacher.shortcut} if config.teacher.model.endswith("_cifar") else {}


def teacher_model(config, quant=None):
  return get_model(config.teacher.model, num_classes=config.num_classes, quant=quant,
                   **_model_kwargs(config))


def load_teacher(config, workdir: str | None = None) -> dict:
  """The teacher's {'params', 'batch_stats'}: converted/restored weights, or the demo's."""
  model = teacher_model(config)
  shape = (1, config.image_size, config.image_size, config.channels)
  if config.teacher.layout == "demo":
    cache = os.path.join(workdir, "teacher") if workdir else None
    if cache and _exists_on_all_processes(cache):
      return convert.load_variables(cache, convert.abstract_variables(model, shape))
    variables = demo.train_teacher(model, seed=config.seed)
    if cache:
      convert.save_variables(variables, cache)   # collective: every process calls it
    return variables
  variables = convert.load_teacher_variables(config.teacher.weights, model,
                                             layout=config.teacher.layout, input_shape=shape)
  if workdir and not os.path.isdir(config.teacher.weights):
    # Keep the converted weights: `--config.teacher.weights=<workdir>/teacher` needs no torch.
    cache = os.path.join(workdir, "teacher")
    if not _exists_on_all_processes(cache):
      convert.save_variables(variables, cache)   # collective: every process calls it
  return variables


def _exists_on_all_processes(path: str) -> bool:
  """Whether `path` is a directory, as process 0 sees it (the same answer everywhere).

  Orbax saves are collective, so every process must take the same branch; a process that
  looked after process 0 had started writing could otherwise skip the save and leave
  process 0 waiting in it.
  """
  exists = os.path.isdir(path)
  if jax.process_count() > 1:
    exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
  return exists


def build_models(config, teacher_vars: dict) -> Models:
  """Teacher (FP), student (quantized, same definition) and generator modules."""
  gen_name = config.generator.name
  generator = get_generator(gen_name, num_classes=config.num_classes,
                            image_size=config.image_size, channels=config.channels,
                            latent_dim=config.generator.latent_dim,
                            width=config.generator.width, bn_eps=config.generator.bn_eps,
                            conv_impl=config.generator.conv_impl,
                            dtype=config.generator.dtype)
  return Models(teacher=teacher_model(config), student=teacher_model(config, quant_policy(config)),
                generator=generator, teacher_vars=teacher_vars,
                num_classes=config.num_classes,
                image_shape=(config.image_size, config.image_size, config.channels),
                latent_dim=config.generator.latent_dim)


def load_eval_set(config, split: str | None = None, limit: int | None = None) -> ImageDataset:
  """Real images of `split` (default data.split; evaluation only, never for training)."""
  d = config.data
  split = split or d.split
  limit = limit or d.limit or None
  if d.source == "digits":
    ds = demo.digits_dataset(split)
    if limit:
      ds = ds.take(limit)
  elif d.source == "imagefolder":
    ds = load_eval_data("imagefolder", root=d.root, split=split,
                        preprocessing=d.preprocessing, limit=limit,
                        cache_dir=d.cache_dir or None)
  else:
    ds = load_eval_data("tfds", data_dir=d.data_dir, name=d.name, split=split or None,
                        preprocessing=d.preprocessing, limit=limit, download=d.download)
  if ds.num_classes != config.num_classes:
    raise ValueError(f"the eval data has {ds.num_classes} classes but num_classes="
                     f"{config.num_classes}: check data.root / data.name.")
  if ds.images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"eval images are {ds.images.shape[1]}x{ds.images.shape[2]} but the "
                     f"model expects {config.image_size}x{config.image_size}: check "
                     "data.preprocessing or image_size.")
  return ds


def calibrate_ranges(student, variables: dict, batches, *, observer: str = "minmax",
                     percentile: float = 99.999) -> dict:
  """Activation ranges of `student` over float NHWC `batches`.

  Each batch gives every QuantAct a (min, max) by `observer` (numerics.observe_range:
  minmax, sample_mean, percentile or mse), computed on its input in the same forward,
  where the earlier layers are already quantized with their new ranges (ZeroQ/DSG-PTQ);
  several batches combine by running min / max. Returns the `quant_stats` tree.
  """
  calib_model = student.clone(
      quant=dataclasses.replace(student.quant, range_mode="minmax", axis_name=None,
                                observer=observer, percentile=percentile))

  @jax.jit
  def update(quant_stats, x):
    _, upd = calib_model.apply({**variables, "quant_stats": quant_stats}, x,
                               mutable=["quant_stats"])
    return upd["quant_stats"]

  quant_stats = variables["quant_stats"]
  for x in batches:
    quant_stats = update(quant_stats, jnp.asarray(x))
  return quant_stats


def calibration_batches(config, norm: Normalization, key):
  """Float NHWC batches for range calibration (config.calib).

  source='noise': N(0, 1) images in the model's normalised input space (data-free).
  source='real': the first calib.batches * calib.batch_size images of the real
  calib.split (default 'train', never the evaluation split), a real-data reference point.
  """
  c = config.calib
  shape = (c.batch_size, config.image_size, config.image_size, config.channels)
  if c.source == "noise":
    for i in range(c.batches):
      yield jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    return
  real = load_eval_set(config, split=c.split, limit=c.batches * c.batch_size)
  mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
  for i in range(c.batches):
    x = real.images[i * c.batch_size:(i + 1) * c.batch_size]
    if len(x):
      yield (x.astype(np.float32) / 255.0 - mean) / std
