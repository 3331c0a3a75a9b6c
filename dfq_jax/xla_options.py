"""XLA compiler options for the jitted hot loops (training step, PTQ synthesis, evaluation).

On CPU, XLA (jaxlib 0.10) hands convolutions, dots and reductions to YNNPACK fusions. For
the small-channel 3x3 convolutions of CIFAR ResNets its kernels are slower than XLA's
own (Eigen) ones, on the training iteration and on evaluation alike (measured in the
README's speed section). `cpu_conv_kernels` selects this:

  'eigen' (default): YNNPACK for dots and reductions only;
  'ynn': XLA's defaults (convolutions in YNNPACK too).

The options only touch XLA:CPU; on GPU/TPU nothing is passed. A user's own
`--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS always wins.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

CPU_CONV_KERNELS = ("eigen", "ynn")
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# Everything XLA puts in YNNPACK fusions by default, except the convolutions.
_EIGEN_CONVS = {_YNN_FLAG: "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def check_cpu_conv_kernels(value: str) -> None:
  if value not in CPU_CONV_KERNELS:
    raise ValueError(
      f"cpu_conv_kernels={value!r} is unknown: use one of "
      f"{list(CPU_CONV_KERNELS)} (eigen = faster on small-channel CNNs)."
    )


@functools.cache
def _accepted(options: tuple) -> bool:
  """Whether this jaxlib accepts `options` (probe compile of a trivial function)."""
  try:
    jax.jit(lambda x: x + 1).lower(jnp.zeros(2)).compile(dict(options))
    return True
  except Exception as e:
    logging.warning(
      "XLA rejects the compiler options %s (%s); using XLA's defaults.",
      dict(options),
      str(e).splitlines()[0][:200],
    )
    return False


def compiler_options(cpu_conv_kernels: str = "eigen") -> dict | None:
  """Options for `jax.jit(..., compiler_options=...)` of a convolutional hot loop."""
  check_cpu_conv_kernels(cpu_conv_kernels)
  if cpu_conv_kernels == "ynn" or jax.default_backend() != "cpu":
    return None
  if _YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
    return None
  return dict(_EIGEN_CONVS) if _accepted(tuple(_EIGEN_CONVS.items())) else None
