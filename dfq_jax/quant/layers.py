"""Flax linen layers that fake-quantize: QConv, QDense, QuantAct, and the QuantPolicy.

One model definition serves the full-precision teacher and the quantized student: every
conv/dense of a model is a `QConv`/`QDense` and every ReLU/ReLU6 is followed by a
`QuantAct`. With `quant=None` (the teacher) they are plain conv/dense/identity layers;
with a `QuantPolicy` they fake-quantize following the GDFQ-family convention
(methods.md §2.3): per-output-channel min/max weights recomputed each call, per-tensor
activation ranges kept in the `quant_stats` collection.

Activation ranges update only when `quant_stats` is passed as mutable to `apply` (and not
while initialising); pass it immutable to freeze them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfq_jax.quant import numerics
from dfq_jax.quant.narrow_input_conv import MAX_INPUT_CHANNELS, narrow_input_conv

FULL_PRECISION = 32  # a bit-width meaning "leave this layer in full precision"
PROBE_BITS = "probe_bits"  # collection of the per-layer bit-widths of a probe policy
# config.compute_dtype -> the dtype convs and matmuls run in (None: float32 as given).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def _low_precision(dtype) -> bool:
  """Whether `dtype` asks for a narrower compute type than float32 (then f32 accumulation)."""
  return dtype is not None and jnp.dtype(dtype) != jnp.float32


def _check_layer_bits(bits, what):
  if bits is None or bits == FULL_PRECISION:
    return bits
  return numerics.check_bits(bits, what)


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
  """Which layers quantize, at which bit-width, and how activation ranges update.

  Attributes:
    w_bits: default weight bit-width of every conv/dense (2..8, or 32 for FP).
    a_bits: default activation bit-width after every ReLU/ReLU6 (2..8, or 32).
    first_bits: weight bits of the first conv (role 'first'); None = w_bits. The
      GDFQ-family default quantizes it at w_bits; BRECQ-style papers use 8.
    last_bits: weight bits of the classifier (role 'last'); None = w_bits.
    rules: per-layer overrides, tuples (regex, w_bits, a_bits) matched with
      `re.search` against the layer path ('layer1_0/conv1'); the first matching rule
      wins; None in a rule means "keep the default"; 32 means full precision.
    range_mode: 'bias_corrected' (the GDFQ-family EMA), 'ema' (plain EMA) or 'minmax'.
    range_decay: EMA decay beta (0.9 in the papers).
    axis_name: mapped axis over which batch min/max are reduced (inside shard_map).
    observer: how one batch of activations gives its (min, max) before the range update
      ('minmax' in training; 'sample_mean', 'percentile' or 'mse' for PTQ calibration,
      see `numerics.observe_range`).
    percentile: the upper percentile of observer='percentile'.
    probe: read every quantizer's bit-width from the `probe_bits` collection (a float32
      scalar per layer, >= 32 = full precision; see `PROBE_BITS`) instead of the fields
      above, forward only: one compiled forward serves every per-layer bit assignment
      (the mixed-precision sensitivity, quant/mixed.py). Activation ranges are then kept
      for every QuantAct.
    deploy: the int8-engine deployment quantizer (export/integer_graph.py): every tensor
      an integer kernel reads is quantized, so `QuantAct(deploy=True)` layers quantize the
      input image, each conv output that meets a residual sum or ends a block without an
      activation, and the pooled features, at `deploy_bits`; every activation range
      includes 0 (zero padding and zero channels exact, zero points in uint8). Needs
      weight_mode='symmetric' (int8 weights of zero point 0). Off, those layers are the
      identity and the student is the papers'.
    deploy_bits: bit-width of the deployment quantizers (8: the int8 engine's own width;
      a rule's a_bits overrides it per layer).
  """

  w_bits: int = 4
  a_bits: int = 4
  first_bits: int | None = None
  last_bits: int | None = None
  rules: tuple[tuple[str, int | None, int | None], ...] = ()
  range_mode: str = "bias_corrected"
  weight_mode: str = "asymmetric"
  range_decay: float = 0.9
  axis_name: str | None = None
  observer: str = "minmax"
  percentile: float = 99.999
  probe: bool = False
  deploy: bool = False
  deploy_bits: int = 8

  def __post_init__(self):
    _check_layer_bits(self.deploy_bits, "deploy_bits")
    if self.deploy and self.weight_mode != "symmetric":
      raise ValueError(
        "quant.deploy=True needs symmetric weights (int8 engines take weights of zero point "
        "0): pass --config.quant.weight_mode=symmetric, or the config argument 'deploy'."
      )
    _check_layer_bits(self.w_bits, "w_bits")
    _check_layer_bits(self.a_bits, "a_bits")
    _check_layer_bits(self.first_bits, "first_bits")
    _check_layer_bits(self.last_bits, "last_bits")
    for rule in self.rules:
      if len(rule) != 3:
        raise ValueError(f"quant rule {rule!r} must be (regex, w_bits, a_bits).")
      try:
        re.compile(rule[0])
      except re.error as e:
        raise ValueError(f"quant rule regex {rule[0]!r} does not compile: {e}") from e
      _check_layer_bits(rule[1], f"w_bits of rule {rule[0]!r}")
      _check_layer_bits(rule[2], f"a_bits of rule {rule[0]!r}")
    if self.weight_mode not in numerics.WEIGHT_MODES:
      raise ValueError(
        f"weight_mode={self.weight_mode!r} is unknown: use one of {numerics.WEIGHT_MODES}."
      )
    if self.range_mode not in numerics.RANGE_MODES:
      raise ValueError(
        f"range_mode={self.range_mode!r} is unknown: use one of {numerics.RANGE_MODES}."
      )
    if self.observer not in numerics.OBSERVERS:
      raise ValueError(f"observer={self.observer!r} is unknown: use one of {numerics.OBSERVERS}.")
    if not 50.0 < self.percentile <= 100.0:
      raise ValueError(f"percentile={self.percentile} must lie in (50, 100].")
    if not 0.0 < self.range_decay < 1.0:
      raise ValueError(f"range_decay={self.range_decay} must lie in (0, 1).")

  def _rule(self, path: str, index: int):
    for rule in self.rules:
      if re.search(rule[0], path) and rule[index] is not None:
        return rule[index]
    return None

  def weight_bits(self, path: str, role: str = "") -> int | None:
    """Weight bit-width of the layer at `path`; None means full precision."""
    bits = self._rule(path, 1)
    if bits is None and role == "first" and self.first_bits is not None:
      bits = self.first_bits
    if bits is None and role == "last" and self.last_bits is not None:
      bits = self.last_bits
    if bits is None:
      bits = self.w_bits
    return None if bits == FULL_PRECISION else bits

  def act_bits(self, path: str, deploy: bool = False) -> int | None:
    """Activation bit-width of the QuantAct at `path` (a deployment quantizer if `deploy`:
    None unless the policy deploys); None means full precision."""
    if deploy and not self.deploy:
      return None
    bits = self._rule(path, 2)
    if bits is None:
      bits = self.deploy_bits if deploy else self.a_bits
    return None if bits == FULL_PRECISION else bits

  def act_range(self, x_min, x_max):
    """The (lo, hi) an activation quantizer uses for its stored range: as stored, or
    widened to include 0 by the deployment quantizer (numpy or jax scalars)."""
    if not self.deploy:
      return x_min, x_max
    return jnp.minimum(x_min, 0.0), jnp.maximum(x_max, 0.0)

  def explicit_weight_bits(self, path: str, role: str = "") -> int | None:
    """The weight bits a rule or first_bits/last_bits sets for `path` (None: the default)."""
    bits = self._rule(path, 1)
    if bits is None and role == "first":
      bits = self.first_bits
    if bits is None and role == "last":
      bits = self.last_bits
    return bits

  def explicit_act_bits(self, path: str) -> int | None:
    """The activation bits a rule sets for `path` (None: the default a_bits)."""
    return self._rule(path, 2)

  def describe(self) -> str:
    """One-line summary for logs and results."""
    parts = [f"W{self.w_bits}A{self.a_bits}"]
    if self.first_bits is not None:
      parts.append(f"first W{self.first_bits}")
    if self.last_bits is not None:
      parts.append(f"last W{self.last_bits}")
    if len(self.rules) > 4:  # a mixed-precision allocation: one rule per layer
      parts.append(f"{len(self.rules)} per-layer rules")
    else:
      parts += [f"rule {r[0]}: W{r[1]} A{r[2]}" for r in self.rules]
    parts.append(f"ranges {self.range_mode}")
    if self.weight_mode != "asymmetric":
      parts.append(f"{self.weight_mode} weights")
    if self.deploy:
      parts.append(f"deployment quantizers A{self.deploy_bits}")
    return ", ".join(parts)


def _layer_path(module: nn.Module) -> str:
  return "/".join(module.scope.path)


def _probe_bits(module: nn.Module, name: str) -> jax.Array:
  """The bit-width of a probe policy's quantizer `name` ('w', 'w_<role>' or 'a') of `module`."""
  full = lambda: jnp.full((), FULL_PRECISION, jnp.float32)
  return module.variable(PROBE_BITS, name, full).value


def _quantized_kernel(module: nn.Module, kernel: jax.Array) -> jax.Array:
  """`kernel` fake-quantized at the weight bits `module.quant` gives its layer."""
  quant = module.quant
  if quant.probe:
    name = f"w_{module.role}" if module.role else "w"  # the role tells a pin of first/last
    return numerics.probe_quantize_weight(kernel, _probe_bits(module, name), quant.weight_mode)
  bits = quant.weight_bits(_layer_path(module), module.role)
  if bits is None:
    return kernel
  return numerics.quantize_weight(kernel, bits, quant.weight_mode)


def _pairs(padding) -> tuple | None:
  """Explicit ((top, bottom), (left, right)) padding, or None for 'SAME'/'VALID' strings."""
  if isinstance(padding, str):
    return None
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _narrow_input(in_channels: int, groups: int, padding, strides) -> bool:
  """Whether a conv takes the GEMM input gradient of `narrow_input_conv`: a strided stem
  conv over image channels (ImageNet ResNets 7x7/2, MobileNetV2 3x3/2; the CIFAR ResNets'
  3x3/1 stem measured no faster), explicit padding, in float32 or bfloat16."""
  narrow = in_channels <= MAX_INPUT_CHANNELS and groups == 1 and max(strides) > 1
  return narrow and _pairs(padding) is not None


def torch_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's default conv/linear init, kaiming_uniform(a=√5) = U(±1/√fan_in)."""
  fan_in = math.prod(shape[:-1])
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in):
  """PyTorch's default conv/linear bias init, U(±1/√fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class QConv(nn.Module):
  """2-D convolution (NHWC, HWIO kernel) with optional per-channel weight fake quant.

  Padding defaults to PyTorch's symmetric `k // 2` on each side (not 'SAME', which pads
  asymmetrically at stride 2 and would break logit parity with PyTorch weights).
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = None
  use_bias: bool = False
  feature_group_count: int = 1
  quant: QuantPolicy | None = None
  role: str = ""
  kernel_init: Any = torch_kernel_init
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    in_ch = x.shape[-1]
    if in_ch % self.feature_group_count:
      raise ValueError(
        f"{_layer_path(self)}: {in_ch} input channels not divisible "
        f"by {self.feature_group_count} groups."
      )
    kernel = self.param(
      "kernel", self.kernel_init, (kh, kw, in_ch // self.feature_group_count, self.features)
    )
    if self.quant is not None:
      kernel = _quantized_kernel(self, kernel)
    padding = self.padding
    if padding is None:
      padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    x_dtype, low = x.dtype, _low_precision(self.dtype)
    if _narrow_input(in_ch, self.feature_group_count, padding, self.strides):
      y = narrow_input_conv(
        x.astype(self.dtype) if low else x,
        kernel.astype(self.dtype) if low else kernel,
        tuple(self.strides),
        _pairs(padding),
      )
    else:
      y = jax.lax.conv_general_dilated(
        x.astype(self.dtype) if low else x,
        kernel.astype(self.dtype) if low else kernel,
        window_strides=tuple(self.strides),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.feature_group_count,
        preferred_element_type=jnp.float32 if low else None,
      )
    y = y.astype(x_dtype)
    if self.use_bias:
      fan_in = kh * kw * in_ch // self.feature_group_count
      y = y + self.param("bias", torch_bias_init(fan_in), (self.features,))
    return y


class QDense(nn.Module):
  """Dense layer ([in, out] kernel) with optional per-output-channel weight fake quant."""

  features: int
  use_bias: bool = True
  quant: QuantPolicy | None = None
  role: str = ""
  kernel_init: Any = torch_kernel_init
  dtype: Any = None  # matmul compute dtype (None: the input's); float32 accumulation

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    if self.quant is not None:
      kernel = _quantized_kernel(self, kernel)
    if _low_precision(self.dtype):
      y = jnp.dot(
        x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32
      ).astype(x.dtype)
    else:
      y = x @ kernel
    if self.use_bias:
      y = y + self.param("bias", torch_bias_init(x.shape[-1]), (self.features,))
    return y


# The bit-width the 'mse' observer searches a range for in a probe policy (its ranges serve
# every bit-width; the mixed-precision sensitivity observes with minmax).
MAX_PROBE_OBSERVER_BITS = 8


class QuantAct(nn.Module):
  """Per-tensor activation fake quantization with a range in `quant_stats`.

  Variables (collection `quant_stats`): `x_min`, `x_max` (scalars, start at 0) and
  `beta_t` (starts at 1 = never updated). With `quant=None` or a full-precision
  activation this is the identity and creates no variables. `deploy=True` marks a
  quantizer of the deployment quantizer only (`QuantPolicy.deploy`): the identity otherwise.
  """

  quant: QuantPolicy | None = None
  deploy: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.quant is None or (self.deploy and not self.quant.deploy):
      return x
    if self.quant.probe:
      bits = MAX_PROBE_OBSERVER_BITS
    else:
      bits = self.quant.act_bits(_layer_path(self), self.deploy)
    if bits is None:
      return x
    zeros = lambda: jnp.zeros((), jnp.float32)
    x_min = self.variable("quant_stats", "x_min", zeros)
    x_max = self.variable("quant_stats", "x_max", zeros)
    beta_t = self.variable("quant_stats", "beta_t", lambda: jnp.ones((), jnp.float32))
    if self.is_mutable_collection("quant_stats") and not self.is_initializing():
      batch_min, batch_max = numerics.observe_range(
        x, observer=self.quant.observer, bits=bits, percentile=self.quant.percentile
      )
      if self.quant.axis_name is not None:
        batch_min = jax.lax.pmin(batch_min, self.quant.axis_name)
        batch_max = jax.lax.pmax(batch_max, self.quant.axis_name)
      x_min.value, x_max.value, beta_t.value = numerics.update_range(
        x_min.value,
        x_max.value,
        beta_t.value,
        batch_min,
        batch_max,
        mode=self.quant.range_mode,
        decay=self.quant.range_decay,
      )
    lo, hi = self.quant.act_range(x_min.value, x_max.value)
    lo, hi = lo.astype(x.dtype), hi.astype(x.dtype)
    if self.quant.probe:
      return numerics.probe_fake_quant(x, _probe_bits(self, "a"), lo, hi)
    return numerics.fake_quant_ste(x, bits, lo, hi)
