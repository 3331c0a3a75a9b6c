"""DSG inter-sample correlation inhibition (SCI, TPAMI; §4.4): similarity spectrum and loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dfq_jax.losses._base import Array, ArrayLike, _float, _safe_norm


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _eigh_broadened(a: Array, eps: float) -> tuple[Array, Array]:
  """Symmetric eigendecomposition (ascending) with a broadened eigenvector derivative."""
  w, v = jnp.linalg.eigh(a)
  return w, v


@_eigh_broadened.defjvp
def _eigh_broadened_jvp(eps, primals, tangents):
  (a,), (da,) = primals, tangents
  w, v = jnp.linalg.eigh(a)
  da = 0.5 * (da + da.T)
  vdav = v.T @ da @ v
  # The exact derivative has F_ij = 1/(w_j − w_i), which is infinite for (near-)degenerate
  # eigenvalues; (w_j − w_i)/((w_j − w_i)² + eps) is bounded by 1/(2√eps) and 0 on ties.
  gap = w[None, :] - w[:, None]
  f = gap / (jnp.square(gap) + eps)
  return (w, v), (jnp.diagonal(vdav), v @ (f * vdav))


def similarity_spectrum(x: ArrayLike, *, eig_grad_eps: float = 1e-8) -> tuple[Array, Array]:
  """Canonical eigendecomposition of the batch cosine-similarity matrix.

  Φ = x reshaped to [B, D] with rows l2-normalised (norm floored at 1e-12), S = ΦΦᵀ,
  eigenvalues sorted in descending order, each eigenvector's sign fixed so its
  largest-|component| entry is positive. Differentiable: the eigenvector derivative uses
  the broadened factor (w_j − w_i)/((w_j − w_i)² + eig_grad_eps) instead of 1/(w_j − w_i),
  so gradients stay finite for degenerate spectra (e.g. B > D, or S = I).

  Args:
    x: [B, ...].
    eig_grad_eps: broadening of the eigenvector derivative (scale of S's eigenvalues is
      O(1)–O(B)).

  Returns:
    (eigenvalues [B] descending, eigenvectors [B, B] as columns).

  References: DSG (Qin et al., TPAMI, arXiv:2109.00212), `compute_sci`.
  """
  x = _float(x)
  phi = x.reshape(x.shape[0], -1)
  phi = phi / jnp.maximum(_safe_norm(phi, axis=-1), 1e-12)[:, None]
  s = phi @ phi.T
  s = 0.5 * (s + s.T)
  w, v = _eigh_broadened(s, eig_grad_eps)
  w, v = w[::-1], v[:, ::-1]
  pivot = jnp.argmax(jnp.abs(v), axis=0)
  signs = jnp.sign(v[pivot, jnp.arange(v.shape[1])])
  signs = jax.lax.stop_gradient(jnp.where(signs == 0, 1.0, signs))
  return w, v * signs[None, :]


def sci_terms(
  x: ArrayLike, noise: ArrayLike, *, differentiable: bool = True, eig_grad_eps: float = 1e-8
) -> dict[str, Array]:
  """The two terms of DSG's inter-sample correlation inhibition loss.

  magnitude = 1e-4·mean_k (λ_k − λ_r,k)², structure = |Σ_k λ̃_r,k·(−Σ_i V_ik V_r,ik)|,
  where (λ, V) and (λ_r, V_r) are `similarity_spectrum(x)` and of the noise, and λ̃_r is
  min-max normalised (range floored at 1e-12). The noise side is under stop_gradient.
  `differentiable=False` reproduces the released code, which detaches the eigen outputs:
  same value, exactly zero gradient.

  Args:
    x: [B, ...] generated images.
    noise: array of the same shape, fresh N(0, 1) every step.
    differentiable: paper intent (True) or code parity (False).
    eig_grad_eps: see `similarity_spectrum`.

  Returns:
    {'magnitude': scalar, 'structure': scalar}.

  References: DSG (Qin et al., TPAMI, arXiv:2109.00212), `compute_sci`.
  """
  x = _float(x)
  if not differentiable:
    x = jax.lax.stop_gradient(x)
  w, v = similarity_spectrum(x, eig_grad_eps=eig_grad_eps)
  w_r, v_r = similarity_spectrum(jax.lax.stop_gradient(_float(noise)), eig_grad_eps=eig_grad_eps)
  magnitude = 1e-4 * jnp.mean(jnp.square(w - w_r))
  span = jnp.maximum(jnp.max(w_r) - jnp.min(w_r), 1e-12)
  w_r_norm = (w_r - jnp.min(w_r)) / span
  structure = jnp.abs(jnp.sum(w_r_norm * -jnp.sum(v * v_r, axis=0)))
  return {"magnitude": magnitude, "structure": structure}


def sci_loss(
  x: ArrayLike, noise: ArrayLike, *, differentiable: bool = True, eig_grad_eps: float = 1e-8
) -> Array:
  """DSG's inter-sample correlation inhibition loss, magnitude + structure (`sci_terms`).

  The QAT/PTQ code adds it to L_G with weight 1/L (L = number of BN layers). That weight
  was never exercised with a gradient in the released code; re-tune it for
  `differentiable=True`.

  Args:
    x: [B, ...]; noise: same shape. differentiable, eig_grad_eps: see `sci_terms`.

  Returns:
    Scalar.

  References: DSG (Qin et al., TPAMI, arXiv:2109.00212), `compute_sci`.
  """
  terms = sci_terms(x, noise, differentiable=differentiable, eig_grad_eps=eig_grad_eps)
  return terms["magnitude"] + terms["structure"]
