"""AdaDFQ: adaptive data-free quantization (Qian et al., CVPR 2023, arXiv:2303.06869;
methods.md §5).

A zero-sum game: the generator produces samples whose adaptability to the quantized
student (the batch-normalised entropy H' of softmax(t - q)) lies within [lambda_l,
lambda_u], bounded by disagreement (L_ds, softmax(t - q)) and agreement (L_as,
softmax(t + q)) samples:
  L_G = h + beta * (alpha_ds * L_ds + alpha_as * L_as) + gamma * L_BNS
The student maximises the entropy of the tempered disagreement distribution (code form):
  L_Q = -T^2 * mean_b H(softmax((t - q) / T)),  T = 20 (CIFAR), 5 (ImageNet).
The generator's loss sees the student's logits with gradient to the images (STE); only
the generator's parameters are updated by it.
"""

from __future__ import annotations

import types

from dfq_jax import losses
from dfq_jax.interfaces import no_constants

USES_STUDENT_IN_GENERATOR_LOSS = True


def hparams(config):
  c = config.adadfq
  return types.SimpleNamespace(
    lambda_l=c.lambda_l,
    lambda_u=c.lambda_u,
    alpha_ds=c.alpha_ds,
    alpha_as=c.alpha_as,
    beta=c.beta,
    gamma=c.gamma,
    temperature=c.temperature,
  )


init_constants = no_constants


def generator_loss(
  hp, *, images, labels, teacher_logits, bn_stats, running_stats, student_logits, constants, key
):
  del images, constants, key
  loss, terms = losses.adadfq_generator_loss(
    student_logits,
    teacher_logits,
    labels,
    lambda_l=hp.lambda_l,
    lambda_u=hp.lambda_u,
    alpha_ds=hp.alpha_ds,
    alpha_as=hp.alpha_as,
    beta=hp.beta,
  )
  bns = losses.bn_stat_loss(bn_stats, running_stats)
  terms = dict(terms, bns=bns)
  return loss + hp.gamma * bns, terms


def student_loss(hp, *, student_logits, teacher_logits, labels):
  del labels
  loss = losses.adadfq_student_loss(student_logits, teacher_logits, temperature=hp.temperature)
  return loss, {"entropy_loss": loss}
