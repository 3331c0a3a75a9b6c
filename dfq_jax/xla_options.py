"""XLA compiler options for the jitted hot loops (training step, PTQ synthesis, evaluation).

On CPU, XLA (jaxlib 0.10) hands convolutions, dots and reductions to YNNPACK fusions. For
the small-channel 3x3 convolutions of CIFAR ResNets its kernels are slower than XLA's
own (Eigen) ones, on the training iteration and on evaluation alike (measured in the
README's speed section). `cpu_conv_kernels` selects this:

  'eigen' (default): YNNPACK for dots and reductions only;
  'ynn': XLA's defaults (convolutions in YNNPACK too).

The options only touch XLA:CPU; on GPU/TPU nothing is passed. A user's own
`--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS always wins.

`limit_host_blas_threads` keeps the host LAPACK that XLA:CPU's linear-algebra custom calls
run in (scipy's OpenBLAS: `jnp.linalg.eigh` in DSG's SCI term) to one thread, so its own
thread pool does not compete with XLA's intra-op threads for the same cores.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import scipy.linalg.cython_lapack  # noqa: F401  (loads the LAPACK jax's CPU linalg calls)
import threadpoolctl

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


# A user's own thread settings for OpenBLAS win over `limit_host_blas_threads`.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def limit_host_blas_threads() -> threadpoolctl.threadpool_limits | None:
  """One thread for the host BLAS/LAPACK libraries of this process, on the CPU backend.

  XLA:CPU runs `jnp.linalg` ops (eigh, ...) as custom calls into scipy's OpenBLAS. With its
  default thread count OpenBLAS starts its own pool for a 64x64 eigh, whose threads keep
  spinning after the call and take the cores from XLA's convolutions that run next. Called
  by the CLI entry points (`dfq_jax.main`, `dfq_jax.bench`) before any work; library users
  call it themselves. Does nothing (returns None) off the CPU backend or when the user set
  OPENBLAS_NUM_THREADS or OMP_NUM_THREADS. Returns the limiter; its
  `restore_original_limits()` undoes it.
  """
  if jax.default_backend() != "cpu" or any(v in os.environ for v in BLAS_THREAD_VARIABLES):
    return None
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")
