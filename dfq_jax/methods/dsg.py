"""DSG: diverse sample generation (Zhang et al., CVPR 2021, arXiv:2103.01049; Qin et al.,
TPAMI, arXiv:2109.00212; methods.md §4) on the generative (QAT) path.

Generator: L_G = CE(P(x), y) + 0.1 * L_SDA-LSE + w_SCI * L_SCI, with
  - slack distribution alignment (SDA): a hinge with per-layer margins computed from one
    batch of N(0, 1) images through the teacher (the margins' percentile is exposed; the
    original m.npy / n.npy are not public);
  - layerwise sample enhancement (LSE): per-sample statistics of G's batch, sample b
    strengthens layer b mod L (factor 2 on the residual);
  - inter-sample correlation inhibition (SCI): differentiable eigh form, weight 1/L.
The QAT code's variant (set by ':parity'): dsg.sda_form='batch' with a two-sided slack,
dsg.lse='channel', and dsg.sci='logged' (its gradient is zero in the original code).
Student: GDFQ's KD + CE.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from dfq_jax import losses
from dfq_jax.methods import gdfq

USES_STUDENT_IN_GENERATOR_LOSS = False
FORMS = ("sample", "batch")
LSE_MODES = ("modulo", "channel", "off")
SCI_MODES = ("differentiable", "logged", "off")


def hparams(config):
  """DSG's hyperparameters from config.dsg (validated; raises ValueError)."""
  c = config.dsg
  if c.sda_form not in FORMS:
    raise ValueError(f"dsg.sda_form={c.sda_form!r} is unknown: use one of {FORMS}.")
  if c.lse not in LSE_MODES:
    raise ValueError(f"dsg.lse={c.lse!r} is unknown: use one of {LSE_MODES}.")
  if c.sci not in SCI_MODES:
    raise ValueError(f"dsg.sci={c.sci!r} is unknown: use one of {SCI_MODES}.")
  if (c.lse == "channel") != (c.sda_form == "batch") and c.lse != "off":
    raise ValueError(
      f"dsg.lse={c.lse!r} needs dsg.sda_form="
      f"{'batch' if c.lse == 'channel' else 'sample'!r}: 'channel' is the QAT "
      "code's batch-level form, 'modulo' the per-sample one."
    )
  return types.SimpleNamespace(
    **vars(gdfq.hparams(config)),
    sda_weight=c.sda_weight,
    percentile=c.margin_percentile,
    form=c.sda_form,
    two_sided=c.two_sided,
    lse=c.lse,
    lse_factor=c.lse_factor,
    sci=c.sci,
    sci_weight=c.sci_weight,
    margin_batch=config.batch_size,
  )


def init_constants(hp, teacher_bn_stats_fn, running_stats, key, image_shape):
  """Per-layer slack margins from one batch of N(0, 1) images through the teacher."""
  ref = jax.random.normal(key, (hp.margin_batch, *image_shape), jnp.float32)
  bn_stats = teacher_bn_stats_fn(ref)
  return {
    "margins": losses.sda_margins(
      bn_stats, running_stats, percentile=hp.percentile, stat="var", level=hp.form
    )
  }


def generator_loss(
  hp, *, images, labels, teacher_logits, bn_stats, running_stats, student_logits, constants, key
):
  del student_logits
  ce = jnp.mean(losses.cross_entropy(teacher_logits, labels))
  margins = constants["margins"]
  if hp.form == "sample":
    sda = losses.sda_loss_per_sample(
      bn_stats,
      running_stats,
      margins=margins,
      stat="var",
      lse=hp.lse,
      lse_scale=hp.lse_factor,
      reduction="mean",
    )
  else:
    sda = losses.sda_loss(
      bn_stats,
      running_stats,
      margins=margins,
      stat="var",
      two_sided=hp.two_sided,
      reduction="mean",
      lse=hp.lse,
    )
  loss = ce + hp.sda_weight * sda
  terms = {"ce": ce, "sda": sda}
  if hp.sci != "off":
    num_layers = len(jax.tree.leaves(running_stats)) // 2
    weight = hp.sci_weight or 1.0 / num_layers
    noise = jax.random.normal(key, images.shape, images.dtype)
    sci = losses.sci_loss(images, noise, differentiable=hp.sci == "differentiable")
    loss = loss + weight * sci
    terms["sci"] = sci
  return loss, terms


student_loss = gdfq.student_loss
