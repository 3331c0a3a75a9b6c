"""dfq_jax: generative data-free quantization (GDFQ, DSG, AdaDFQ) in JAX/Flax.

Public, import-light pieces: `dfq_jax.losses` (pure loss primitives) and
`dfq_jax.quant` (fake quantization with straight-through estimators).
"""

__version__ = "0.1.0"
