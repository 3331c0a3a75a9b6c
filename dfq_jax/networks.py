"""The three networks of a run, built from its config (teacher, student, generator).

teacher    config.teacher.model with the loaded pretrained weights (FP)
student    the same definition with the QuantPolicy of config.quant
generator  config.generator (a fresh one; its parameters live in the training state)
"""

from __future__ import annotations

from dfq_jax.generators import generator_from_config
from dfq_jax.interfaces import Models
from dfq_jax.models.teacher import teacher_model
from dfq_jax.quant.config import policy_from_config


def build_models(config, teacher_vars: dict) -> Models:
  """Teacher (FP), student (quantized, same definition) and generator modules."""
  return Models(
    teacher=teacher_model(config),
    student=teacher_model(config, policy_from_config(config)),
    generator=generator_from_config(config),
    teacher_vars=teacher_vars,
    num_classes=config.num_classes,
    image_shape=(config.image_size, config.image_size, config.channels),
    latent_dim=config.generator.latent_dim,
  )
