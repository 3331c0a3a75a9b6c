"""Shape, normalisation and conditioning tests of the GDFQ generators (methods.md §2.2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax.generators import get_generator


def _run(gen, batch, key=0):
  z = jax.random.normal(jax.random.key(key), (batch, gen.latent_dim))
  y = jnp.arange(batch) % gen.num_classes
  v = gen.init(jax.random.key(1), z, y)
  return v, gen.apply(v, z, y), z, y


def test_cifar_generator_shape_and_output_standardised():
  gen = get_generator("cifar", num_classes=10)
  v, x, _, _ = _run(gen, 16)
  assert x.shape == (16, 32, 32, 3)
  # Last BN has no affine: each colour channel has batch mean 0 and variance 1.
  np.testing.assert_allclose(jnp.mean(x, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(x, axis=(0, 1, 2)), 1.0, atol=5e-3)  # var/(var+eps)
  assert "bn_out" not in v["params"]  # affine-free
  # PyTorch-style init: linear U(±1/sqrt(100)), label embedding N(0, 1).
  k = v["params"]["l1"]["kernel"]
  assert k.shape == (100, 128 * 8 * 8) and float(jnp.max(jnp.abs(k))) <= 0.1
  assert 0.8 < float(jnp.std(v["params"]["label_emb"]["embedding"])) < 1.2


def test_cifar_generator_is_label_conditional():
  gen = get_generator("cifar", num_classes=10, image_size=8, channels=1)
  z = jax.random.normal(jax.random.key(0), (8, 100))
  y = jnp.zeros((8,), jnp.int32)
  v = gen.init(jax.random.key(1), z, y)
  assert gen.apply(v, z, y).shape == (8, 8, 8, 1)
  assert not np.allclose(gen.apply(v, z, y), gen.apply(v, z, y + 3))


def test_imagenet_generator_shape_small_image():
  # 224 is the real size (tested in the slow suite); the structure is size-independent.
  gen = get_generator("imagenet", num_classes=1000, image_size=32)
  v, x, _, _ = _run(gen, 4)
  assert x.shape == (4, 32, 32, 3)
  assert v["params"]["bn1"]["scale"]["embedding"].shape == (1000, 128)
  np.testing.assert_allclose(jnp.mean(x, axis=(0, 1, 2)), 0.0, atol=1e-5)


@pytest.mark.slow
def test_imagenet_generator_full_size():
  gen = get_generator("imagenet", num_classes=1000)
  _, x, _, _ = _run(gen, 2)
  assert x.shape == (2, 224, 224, 3)


def test_generator_rejects_bad_size():
  gen = get_generator("cifar", image_size=30)
  with pytest.raises(ValueError, match="divisible by 4"):
    _run(gen, 2)
