"""DSG-PTQ image priors (§4.5): input statistics prior, total variation, l2 norm."""

from __future__ import annotations

import jax.numpy as jnp

from dfq_jax.losses._base import Array, ArrayLike, _float, _safe_norm
from dfq_jax.losses._dsg import sda_per_sample_term


def input_prior_loss(x: ArrayLike, *, eps: float = 1e-6) -> Array:
  """DSG-PTQ input prior: per-sample per-channel image mean → 0 and std → 1, margin 0.

  Same function as the per-sample SDA with the unbiased spatial variance:
  Σ_c mean_{b,c}² + (sqrt(var_{b,c} + eps) − 1)².

  Args:
    x: [B, H, W, C] images (H·W ≥ 2).
    eps: added to the unbiased variance before the square root.

  Returns:
    [B]; the code's loss is the batch mean.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ `getDistilData`.
  """
  x = _float(x)
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  mean = jnp.mean(flat, axis=1)
  var = jnp.var(flat, axis=1, ddof=1)
  return sda_per_sample_term(mean, 0.0, margin=0.0) + sda_per_sample_term(
    jnp.sqrt(var + eps), 1.0, margin=0.0
  )


def total_variation_l2(x: ArrayLike) -> Array:
  """Sum of the l2 norms of the four directional first differences of a batch.

  With x indexed [b, i, j, c] (i: row/H, j: column/W), the differences are
  horizontal x[:, :, :-1] − x[:, :, 1:], vertical x[:, :-1] − x[:, 1:], anti-diagonal
  x[:, 1:, :-1] − x[:, :-1, 1:] and diagonal x[:, :-1, :-1] − x[:, 1:, 1:]; each norm is
  the Frobenius norm over the WHOLE batch tensor (not per sample), so the result is a
  scalar, and the four norms are added (not their squares). The gradient at a constant
  image is 0 (safe norm).

  Args:
    x: [B, H, W, C].

  Returns:
    Scalar.

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ image prior "TV_L2".
  """
  x = _float(x)
  diffs = (
    x[:, :, :-1] - x[:, :, 1:],
    x[:, :-1] - x[:, 1:],
    x[:, 1:, :-1] - x[:, :-1, 1:],
    x[:, :-1, :-1] - x[:, 1:, 1:],
  )
  return sum(_safe_norm(d) for d in diffs)


def l2_norm_prior(x: ArrayLike) -> Array:
  """Per-sample l2 norm of the image (DSG-PTQ prior; the code uses its batch mean).

  Args:
    x: [B, ...].

  Returns:
    [B] ‖x_b‖₂ (gradient 0 at x_b = 0).

  References: DSG (Zhang et al., CVPR 2021, arXiv:2103.01049), PTQ `getDistilData`.
  """
  x = _float(x)
  return _safe_norm(x.reshape(x.shape[0], -1), axis=-1)
