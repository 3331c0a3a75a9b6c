"""GDFQ: generative low-bitwidth data-free quantization (Xu et al., ECCV 2020,
arXiv:2003.03603; methods.md §3).

Generator: L_G = CE(P(x), y) + 0.1 * L_BNS (knowledge matching: class boundary + BN
statistics of the teacher). Student: L_Q = CE(Q(x), y) + alpha * T^2 * KL(t/T || q/T),
T = 20, alpha = 1. The original code's KL is the mean over B*C elements
(gdfq.kd_reduction='elementwise_mean', set by parity); the default is the batch-mean KL.
"""

from __future__ import annotations

import types

import jax.numpy as jnp

from dfq_jax import losses
from dfq_jax.interfaces import no_constants

USES_STUDENT_IN_GENERATOR_LOSS = False


def hparams(config):
  c = config.gdfq
  return types.SimpleNamespace(
    bns_weight=c.bns_weight,
    temperature=c.kd_temperature,
    alpha=c.kd_alpha,
    reduction=c.kd_reduction,
  )


init_constants = no_constants


def generator_loss(
  hp, *, images, labels, teacher_logits, bn_stats, running_stats, student_logits, constants, key
):
  del images, student_logits, constants, key
  ce = jnp.mean(losses.cross_entropy(teacher_logits, labels))
  bns = losses.bn_stat_loss(bn_stats, running_stats)
  return ce + hp.bns_weight * bns, {"ce": ce, "bns": bns}


def student_loss(hp, *, student_logits, teacher_logits, labels):
  loss, terms = losses.kd_loss_gdfq(
    student_logits,
    teacher_logits,
    labels,
    temperature=hp.temperature,
    alpha=hp.alpha,
    reduction=hp.reduction,
  )
  return loss, terms
