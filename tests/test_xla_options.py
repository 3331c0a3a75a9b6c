"""XLA compiler options of the hot loops (dfq_jax/xla_options.py)."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

from dfq_jax import xla_options


def _conv_loss(x, k):
  y = jax.lax.conv_general_dilated(
    x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jnp.sum(jax.nn.relu(y) ** 2)


def _convs_in_ynn_fusions(compiled) -> int:
  """Number of YNNPACK fusions of the compiled HLO whose body holds a convolution."""
  text = compiled.as_text()
  with_conv = set(
    re.findall(r"^%?([\w.-]+) [^\n]*\{\n(?:(?!^\}).*\n)*?.*convolution\(", text, flags=re.M)
  )
  lines = [l for l in text.splitlines() if "__ynn_fusion" in l]
  return sum(re.search(r"calls=%([\w.-]+)", l).group(1) in with_conv for l in lines)


def test_eigen_moves_convolutions_out_of_ynnpack_and_keeps_results(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  opts = xla_options.compiler_options("eigen")
  assert opts == {
    "xla_cpu_experimental_ynn_fusion_type": (
      "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    )
  }
  x = jax.random.normal(jax.random.key(0), (32, 16, 16, 16))
  k = jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) * 0.1
  f = jax.value_and_grad(_conv_loss, argnums=(0, 1))
  default = jax.jit(f).lower(x, k).compile()
  eigen = jax.jit(f, compiler_options=opts).lower(x, k).compile()
  # The compiled programs differ where claimed: XLA's default fuses the convolutions into
  # YNNPACK calls, the option leaves none there.
  assert _convs_in_ynn_fusions(default) > 0
  assert _convs_in_ynn_fusions(eigen) == 0
  for a, b in zip(jax.tree.leaves(default(x, k)), jax.tree.leaves(eigen(x, k))):
    # Same values up to float32 summation order (relative to the largest entry).
    assert np.abs(np.asarray(a) - b).max() <= 1e-5 * np.abs(np.asarray(b)).max()


def test_ynn_and_user_flags_mean_no_options(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_options.compiler_options("ynn") is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=reduce")
  assert xla_options.compiler_options("eigen") is None


def test_bad_value_is_refused():
  with pytest.raises(ValueError, match="cpu_conv_kernels='fast'.*eigen"):
    xla_options.compiler_options("fast")


def test_rejected_options_fall_back_to_defaults(monkeypatch, caplog):
  monkeypatch.setattr(xla_options, "_EIGEN_CONVS", {"xla_cpu_experimental_ynn_fusion_type": "NO"})
  xla_options._accepted.cache_clear()
  try:
    assert xla_options.compiler_options("eigen") is None
    assert "XLA rejects the compiler options" in caplog.text
  finally:
    xla_options._accepted.cache_clear()


def _blas_threads():
  return {
    i["filepath"]: i["num_threads"]
    for i in threadpoolctl.threadpool_info()
    if i["user_api"] == "blas"
  }


def test_limit_host_blas_threads_sets_one_thread_keeps_results_and_restores(monkeypatch):
  for name in xla_options.BLAS_THREAD_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  before = _blas_threads()
  # The LAPACK that XLA:CPU's eigh calls is scipy's OpenBLAS, loaded by xla_options.
  assert any("scipy" in path for path in before), before
  a = jax.random.normal(jax.random.key(0), (64, 64))
  a = a @ a.T
  w_before = np.asarray(jnp.linalg.eigh(a)[0])
  limiter = xla_options.limit_host_blas_threads()
  try:
    assert limiter is not None
    assert set(_blas_threads().values()) == {1}
    w_after = np.asarray(jax.jit(jnp.linalg.eigh)(a)[0])
    np.testing.assert_allclose(w_after, w_before, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
      w_after, np.linalg.eigvalsh(np.asarray(a, np.float64)), rtol=1e-3, atol=1e-3
    )
  finally:
    limiter.restore_original_limits()
  assert _blas_threads() == before


@pytest.mark.parametrize("name", xla_options.BLAS_THREAD_VARIABLES)
def test_a_users_blas_thread_setting_wins(monkeypatch, name):
  for other in xla_options.BLAS_THREAD_VARIABLES:
    monkeypatch.delenv(other, raising=False)
  monkeypatch.setenv(name, "3")
  before = _blas_threads()
  assert xla_options.limit_host_blas_threads() is None
  assert _blas_threads() == before


_ENTRY_POINT = """
import sys
from absl import app
from dfq_jax import xla_options, {module} as entry

def limited():
  print("host BLAS limited before any work")
  sys.exit(0)

xla_options.limit_host_blas_threads = limited
sys.argv = {argv}
app.run(entry.main)
"""


@pytest.mark.parametrize(
  "module, argv",
  [("main", ["main", "--workdir", "unused"]), ("bench", ["bench", "speed"])],
)
def test_the_cli_entry_points_limit_the_host_blas_threads_first(module, argv):
  code = _ENTRY_POINT.format(module=module, argv=argv)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "host BLAS limited before any work" in done.stdout
