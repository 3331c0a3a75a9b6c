"""Classification and distillation losses (GDFQ §3) and the softmax entropy (AdaDFQ §5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dfq_jax.losses._base import Array, ArrayLike, _float


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
  """Softmax cross-entropy with integer labels, per example.

  Args:
    logits: [B, C].
    labels: [B] integer class indices.

  Returns:
    [B] losses; `jnp.mean` gives `torch.nn.CrossEntropyLoss()`.

  References: GDFQ (Xu et al., ECCV 2020, arXiv:2003.03603), the CE terms of L_G and L_Q.
  """
  return optax.softmax_cross_entropy_with_integer_labels(_float(logits), jnp.asarray(labels))


def kl_divergence(
  student_logits: ArrayLike, teacher_logits: ArrayLike, *, temperature: float = 1.0
) -> Array:
  """KL(softmax(t/T) || softmax(s/T)) per example, summed over classes (no T² factor).

  Gradients flow into both arguments; stop the teacher's gradient at the call site.

  Args:
    student_logits: [B, C].
    teacher_logits: [B, C].
    temperature: softmax temperature T.

  Returns:
    [B] divergences.

  References: GDFQ (Xu et al., ECCV 2020, arXiv:2003.03603), the KD term of L_Q.
  """
  s = _float(student_logits) / temperature
  t = _float(teacher_logits) / temperature
  # log p_t − log p_s = e − log Σ_c p_s,c exp(e_c), with e = (t − s) centred under p_s.
  # At high T both distributions are close and the naive difference of two log-softmaxes
  # (each ≈ −log C) loses ~3 digits in float32; log1p(Σ p_s expm1(e)) keeps them. Large
  # gaps fall back to the overflow-safe logsumexp(log p_s + e) (double-where keeps grads finite).
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  p_s = jnp.exp(log_p_s)
  d = t - s
  e = d - jnp.sum(p_s * d, axis=-1, keepdims=True)
  small = jnp.max(jnp.abs(e), axis=-1, keepdims=True) <= 1.0
  e_small = jnp.where(small, e, 0.0)
  log_z = jnp.where(
    small,
    jnp.log1p(jnp.sum(p_s * jnp.expm1(e_small), axis=-1, keepdims=True)),
    jax.nn.logsumexp(log_p_s + jnp.where(small, 0.0, e), axis=-1, keepdims=True),
  )
  p_t = jax.nn.softmax(t, axis=-1)
  return jnp.sum(p_t * (e - log_z), axis=-1)


def kd_loss_gdfq(
  student_logits: ArrayLike,
  teacher_logits: ArrayLike,
  labels: ArrayLike,
  *,
  temperature: float = 20.0,
  alpha: float = 1.0,
  reduction: str = "elementwise_mean",
) -> tuple[Array, dict[str, Array]]:
  """GDFQ's student loss: alpha·T²·KL(softmax(t/T) || softmax(s/T)) + CE(s, y).

  `reduction='elementwise_mean'` (default, code parity) averages the KL over all B·C
  elements like `torch.nn.KLDivLoss()`, i.e. 1/C of the per-example KL; `'batchmean'` is
  the per-example mean (the paper-intended KD, methods.md §7.3).

  Args:
    student_logits: [B, C] logits of the quantized student.
    teacher_logits: [B, C] teacher logits (stop their gradient at the call site).
    labels: [B] integer labels the generator was conditioned on.
    temperature: T (20 in GDFQ/DSG-QAT).
    alpha: weight of the KD term.
    reduction: 'elementwise_mean' or 'batchmean'.

  Returns:
    (total scalar, {'kd': scalar, 'ce': scalar}) — the form `jax.value_and_grad(...,
    has_aux=True)` expects.

  References: GDFQ (Xu et al., ECCV 2020, arXiv:2003.03603), trainer `loss_fn_kd`.
  """
  if reduction not in ("elementwise_mean", "batchmean"):
    raise ValueError(f"reduction must be 'elementwise_mean' or 'batchmean'; got {reduction!r}.")
  kl = kl_divergence(student_logits, teacher_logits, temperature=temperature)
  if reduction == "elementwise_mean":
    kl = jnp.mean(kl) / jnp.shape(student_logits)[-1]
  else:
    kl = jnp.mean(kl)
  kd = alpha * temperature**2 * kl
  ce = jnp.mean(cross_entropy(student_logits, labels))
  return kd + ce, {"kd": kd, "ce": ce}


def entropy(logits: ArrayLike, *, temperature: float = 1.0) -> Array:
  """Shannon entropy (nats) of softmax(logits / T), per example.

  Args:
    logits: [B, C]. temperature: T.

  Returns:
    [B].

  References: AdaDFQ (Qian et al., CVPR 2023, arXiv:2303.06869), `compute_entropy`.
  """
  log_p = jax.nn.log_softmax(_float(logits) / temperature, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
