"""AdaDFQ generator and student losses (§5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dfq_jax.losses._base import Array, ArrayLike, _float
from dfq_jax.losses._classification import cross_entropy, entropy


def adadfq_generator_losses(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  labels: ArrayLike,
  *,
  lambda_l: float,
  lambda_u: float,
) -> dict[str, Array]:
  """AdaDFQ's generator terms: entropy of the disagreement sample, margin loss, L_ds, L_as.

  H_b = entropy(softmax(t − q)); H' = (H − min_b H)/(log C − min_b H), the min taken over
  the batch and not detached (denominator floored at 1e-12 so q = t gives no NaN);
  h = mean_b relu(λ_l − H'_b) + mean_b relu(H'_b − λ_u) (batch-size agnostic);
  L_ds = mean_b CE(t − q, y); L_as = mean_b CE(t + q, y). Gradients flow through both
  logits (the generator's gradient reaches it through the teacher and the STE student).

  Args:
    student_logits: [B, C] q. teacher_logits: [B, C] t. labels: [B] integers.
    lambda_l: lower bound λ_l. lambda_u: upper bound λ_u.

  Returns:
    {'entropy': [B] H, 'entropy_norm': [B] H', 'margin': h, 'ds': L_ds, 'as': L_as}.

  References: AdaDFQ (Qian et al., CVPR 2023, arXiv:2303.06869), `marginal_loss` and the
  disagreement/agreement sample losses.
  """
  q, t = _float(student_logits), _float(teacher_logits)
  z_ds = t - q
  h = entropy(z_ds)
  h_min = jnp.min(h)
  h_norm = (h - h_min) / jnp.maximum(math.log(t.shape[-1]) - h_min, 1e-12)
  margin = jnp.mean(jax.nn.relu(lambda_l - h_norm)) + jnp.mean(jax.nn.relu(h_norm - lambda_u))
  return {
    "entropy": h,
    "entropy_norm": h_norm,
    "margin": margin,
    "ds": jnp.mean(cross_entropy(z_ds, labels)),
    "as": jnp.mean(cross_entropy(t + q, labels)),
  }


def adadfq_generator_loss(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  labels: ArrayLike,
  *,
  lambda_l: float,
  lambda_u: float,
  alpha_ds: float,
  alpha_as: float,
  beta: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
  """AdaDFQ generator loss without the BNS term: h + β·(α_ds·L_ds + α_as·L_as).

  The full L_G adds γ·`bn_stat_loss` (γ = 1 in the released configs). There is no plain
  CE(t, y) term.

  Args:
    student_logits: [B, C] q. teacher_logits: [B, C] t. labels: [B].
    lambda_l, lambda_u, alpha_ds, alpha_as, beta: hyperparameters (§5.2).

  Returns:
    (scalar, {'margin', 'ds', 'as'} scalars).

  References: AdaDFQ (Qian et al., CVPR 2023, arXiv:2303.06869).
  """
  terms = adadfq_generator_losses(
    student_logits, teacher_logits, labels, lambda_l=lambda_l, lambda_u=lambda_u
  )
  total = terms["margin"] + beta * (alpha_ds * terms["ds"] + alpha_as * terms["as"])
  return total, {k: terms[k] for k in ("margin", "ds", "as")}


def adadfq_student_loss(
  student_logits: ArrayLike, teacher_logits: ArrayLike, *, temperature: float
) -> Array:
  """AdaDFQ's student loss (code form): −T²·mean_b H(softmax((t − q)/T)).

  Maximises the entropy of the disagreement distribution, i.e. pushes t − q towards a
  constant vector. T = 20 (CIFAR) / 5 (ImageNet) in the released code. Stop the
  teacher's gradient at the call site.

  Args:
    student_logits: [B, C] q. teacher_logits: [B, C] t. temperature: T.

  Returns:
    Scalar.

  References: AdaDFQ (Qian et al., CVPR 2023, arXiv:2303.06869), trainer `loss_fn_kd`.
  """
  z = _float(teacher_logits) - _float(student_logits)
  return -(temperature**2) * jnp.mean(entropy(z, temperature=temperature))
