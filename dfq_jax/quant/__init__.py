"""Fake quantization for the GDFQ-family student (methods.md §2.3).

`numerics` holds pure functions (fake quant, STE, range updates); `layers` the linen
layers (QConv, QDense, QuantAct) and the `QuantPolicy` that says which layers quantize.
"""

from dfq_jax.quant.layers import FULL_PRECISION, QConv, QDense, QuantAct, QuantPolicy
from dfq_jax.quant.numerics import (
  asym_fake_quant,
  fake_quant_ste,
  quantize_weight,
  update_range,
  weight_range,
)

__all__ = [
  "FULL_PRECISION",
  "QConv",
  "QDense",
  "QuantAct",
  "QuantPolicy",
  "asym_fake_quant",
  "fake_quant_ste",
  "quantize_weight",
  "update_range",
  "weight_range",
]
