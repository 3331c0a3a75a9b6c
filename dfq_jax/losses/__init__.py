"""Pure loss primitives for generative data-free quantization (GDFQ, DSG, AdaDFQ).

Everything here is a pure function of arrays or pytrees of arrays: no Flax modules, no
I/O, no global configuration (`from dfq_jax import losses` works anywhere). Method
hyperparameters are keyword-only. Functions named `*_layer`, `cross_entropy`,
`kl_divergence`, `entropy`, `input_prior_loss` and `l2_norm_prior` return per-example
values ([B]) or per-layer scalars; the remaining functions are the scalar aggregates the
trainer optimises. Specification: docs/methods.md §2.5 (BNS), §3 (GDFQ), §4 (DSG), §5
(AdaDFQ), §7 (paper/code disagreements).

BN-statistics trees. The teacher's `BatchNorm` (dfq_jax.models.layers) sows PER-SAMPLE
statistics of its input, `bn_stats[path] = {'mean': [B, C], 'var': [B, C]}` (biased
variance over the spatial axes), in a tree with the same structure as the running
statistics `batch_stats[path] = {'mean': [C], 'var': [C]}`. A "layer node" is a mapping
with exactly the keys {'mean', 'var'}. Tree functions accept per-sample leaves ([B, C],
combined into batch mean / biased variance by the law of total variance, as PyTorch's BN
hooks compute them) or batch-level leaves ([C]) where batch statistics suffice.
Layers are enumerated in the iteration order of the `bn_stats` mapping (for a collection
returned by `Module.apply` inside a step this is the order in which the layers ran; after
a `jax.tree` round-trip it is sorted key order); running statistics and margins are looked
up by path. Only DSG's layer-sample assignment (LSE) depends on this order, and since
generated samples are exchangeable it only decides which layers are left out when the
network has more layers than `layer_num`. `combine_moments` is that per-sample-to-batch
combination (defined in `dfq_jax.stats`, shared with `dfq_jax.models.layers`).

Argument order, as in optax: the prediction first, then the target — student logits
before teacher logits and labels, the generated batch's `bn_stats` (or per-layer mean /
var) before the teacher's running statistics, the generated images before the reference
noise.

References:
  GDFQ: Xu et al., "Generative Low-bitwidth Data Free Quantization", ECCV 2020,
    arXiv:2003.03603.
  DSG: Zhang et al., "Diversifying Sample Generation for Accurate Data-Free
    Quantization", CVPR 2021, arXiv:2103.01049; Qin et al., "Diverse Sample Generation:
    Pushing the Limit of Generative Data-free Quantization", TPAMI, arXiv:2109.00212.
  AdaDFQ: Qian et al., "Adaptive Data-Free Quantization", CVPR 2023, arXiv:2303.06869.
"""

from __future__ import annotations

from dfq_jax.losses._adadfq import (
  adadfq_generator_loss,
  adadfq_generator_losses,
  adadfq_student_loss,
)
from dfq_jax.losses._bn_statistics import bn_stat_loss, bn_stat_loss_layer, to_unbiased_var
from dfq_jax.losses._classification import cross_entropy, entropy, kd_loss_gdfq, kl_divergence
from dfq_jax.losses._dsg import (
  LSE_MODES,
  lse_weights,
  sda_loss,
  sda_loss_layer,
  sda_loss_per_sample,
  sda_margins,
  sda_per_sample_layer,
  sda_per_sample_term,
)
from dfq_jax.losses._image_priors import input_prior_loss, l2_norm_prior, total_variation_l2
from dfq_jax.losses._sci import sci_loss, sci_terms, similarity_spectrum
from dfq_jax.losses._trees import combine_moments, layer_items, lookup_layer

__all__ = (
  # BN-statistics trees.
  "combine_moments",
  "layer_items",
  "lookup_layer",
  # Classification and distillation (GDFQ).
  "cross_entropy",
  "entropy",
  "kd_loss_gdfq",
  "kl_divergence",
  # BN-statistics alignment (GDFQ, AdaDFQ).
  "bn_stat_loss",
  "bn_stat_loss_layer",
  "to_unbiased_var",
  # DSG: slack distribution alignment and layerwise sample enhancement.
  "LSE_MODES",
  "lse_weights",
  "sda_loss",
  "sda_loss_layer",
  "sda_loss_per_sample",
  "sda_margins",
  "sda_per_sample_layer",
  "sda_per_sample_term",
  # DSG: inter-sample correlation inhibition.
  "sci_loss",
  "sci_terms",
  "similarity_spectrum",
  # DSG-PTQ image priors.
  "input_prior_loss",
  "l2_norm_prior",
  "total_variation_l2",
  # AdaDFQ.
  "adadfq_generator_loss",
  "adadfq_generator_losses",
  "adadfq_student_loss",
)
