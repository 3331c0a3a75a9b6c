"""Times the generator's forward+backward with the standard and the sub-pixel convs.

  python -m dfq_jax.generators.bench_subpixel --batch 16 [--rounds 15] [--dtypes float32,bfloat16]

Jits grad(loss)(params) of one generator (with the training step's XLA options,
`--cpu-conv-kernels`) (CIFAR form by default: width 128, latent 100,
32x32) for each (conv_impl, dtype) config, warms every config up, then runs the configs
in alternation for `rounds` rounds (fair on a shared CPU) and prints one JSON line per
config: median/min ms, speed-up over 'standard' with the same dtype, and the relative
L2 deviation of its images and parameter gradients from the float32 'standard' ones.
(float32 'subpixel' deviates ~1e-6; with --seed 0 at batch 16 one leaky-ReLU input lies
within float32 rounding of 0 and flips slope, which moves the gradients by ~6e-4.)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dfq_jax import xla_options
from dfq_jax.generators import get_generator


def _rel_err(a, b) -> float:
  """||a - b|| / ||b|| over all leaves together (per-leaf ratios mislead: the conv biases
  before a BN have ~0 gradient, and a leaky-ReLU input within rounding of 0 may flip)."""
  fa = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(a)]).astype(jnp.float32)
  fb = jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(b)]).astype(jnp.float32)
  return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def run(
  batch: int = 16,
  rounds: int = 15,
  name: str = "cifar",
  image_size: int = 32,
  width: int = 128,
  latent_dim: int = 100,
  num_classes: int = 10,
  impls=("standard", "subpixel"),
  dtypes=("float32", "bfloat16"),
  seed: int = 0,
  cpu_conv_kernels: str = "eigen",
):
  """Returns one result dict per (impl, dtype) config (see the module docstring)."""
  kz, ky, kt, ki = jax.random.split(jax.random.key(seed), 4)
  z = jax.random.normal(kz, (batch, latent_dim))
  labels = jax.random.randint(ky, (batch,), 0, num_classes)
  target = jax.random.normal(kt, (batch, image_size, image_size, 3))
  configs, steps, outs = [], {}, {}
  params = None
  for dtype in dtypes:
    for impl in impls:
      gen = get_generator(
        name,
        num_classes=num_classes,
        image_size=image_size,
        latent_dim=latent_dim,
        width=width,
        conv_impl=impl,
        dtype=dtype,
      )
      if params is None:
        params = gen.init(ki, z, labels)["params"]

      def loss(p, gen=gen):
        images = gen.apply({"params": p}, z, labels)
        return jnp.mean((images - target) ** 2), images

      step = jax.jit(
        jax.value_and_grad(loss, has_aux=True),
        compiler_options=xla_options.compiler_options(cpu_conv_kernels),
      )
      out = jax.block_until_ready(step(params))  # compile
      jax.block_until_ready(step(params))  # warm-up
      configs.append((impl, dtype))
      steps[impl, dtype] = step
      outs[impl, dtype] = (out[0][1], out[1])
  times = {c: [] for c in configs}
  for _ in range(rounds):
    for c in configs:
      t0 = time.perf_counter()
      jax.block_until_ready(steps[c](params))
      times[c].append((time.perf_counter() - t0) * 1e3)
  ref = outs.get(("standard", "float32"))
  results = []
  for impl, dtype in configs:
    med = float(np.median(times[impl, dtype]))
    base = times.get(("standard", dtype))
    r = {
      "generator": name,
      "batch": batch,
      "image_size": image_size,
      "width": width,
      "conv_impl": impl,
      "dtype": dtype,
      "median_ms": round(med, 2),
      "min_ms": round(float(np.min(times[impl, dtype])), 2),
      "rounds": rounds,
      "speedup_vs_standard": round(float(np.median(base)) / med, 3) if base else None,
    }
    if ref is not None:
      r["rel_err_images_vs_standard_f32"] = float(f"{_rel_err(outs[impl, dtype][0], ref[0]):.2e}")
      r["rel_err_grads_vs_standard_f32"] = float(f"{_rel_err(outs[impl, dtype][1], ref[1]):.2e}")
    results.append(r)
  return results


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--generator", default="cifar", choices=("cifar", "imagenet"))
  ap.add_argument("--image-size", type=int, default=32)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--num-classes", type=int, default=10)
  ap.add_argument("--impls", default="standard,subpixel")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--cpu-conv-kernels",
    default="eigen",
    choices=xla_options.CPU_CONV_KERNELS,
    help="XLA:CPU convolution kernels (dfq_jax/xla_options.py)",
  )
  a = ap.parse_args(argv)
  for r in run(
    a.batch,
    a.rounds,
    a.generator,
    a.image_size,
    a.width,
    num_classes=a.num_classes,
    impls=tuple(a.impls.split(",")),
    dtypes=tuple(a.dtypes.split(",")),
    seed=a.seed,
    cpu_conv_kernels=a.cpu_conv_kernels,
  ):
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
