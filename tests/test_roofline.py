"""nbp.roofline: the floor of a step from the bytes it reads and the FLOPs XLA counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbp import roofline


def test_floor_takes_the_larger_term_and_names_it():
  machine = roofline.Machine(bandwidth=1e9, matmul_rate=1e10)
  memory_bound = roofline.floor(bytes_read=2_000_000, flops=1e6, machine=machine)  # 2 ms against 0.1 ms
  assert memory_bound.seconds == pytest.approx(2e-3) and memory_bound.bound == "bandwidth"
  compute_bound = roofline.floor(bytes_read=1_000, flops=5e7, machine=machine)  # 1 us against 5 ms
  assert compute_bound.seconds == pytest.approx(5e-3) and compute_bound.bound == "compute"
  assert roofline.as_dict(0.01, compute_bound)["of_floor"] == pytest.approx(2.0)


def test_compiled_flops_is_xlas_count_of_a_matmul():
  m, k, n = 32, 48, 64
  compiled = jax.jit(jnp.dot).lower(jnp.zeros((m, k)), jnp.zeros((k, n))).compile()
  assert roofline.compiled_flops(compiled) == pytest.approx(2 * m * k * n, rel=0.05)


def test_tree_bytes_counts_every_leaf_by_its_dtype():
  tree = {"w": jnp.zeros((3, 4), jnp.float32), "cache": [jnp.zeros((5,), jnp.bfloat16)]}
  assert roofline.tree_bytes(tree) == 3 * 4 * 4 + 5 * 2
  assert roofline.tree_bytes(tree, tree) == 2 * roofline.tree_bytes(tree)


def test_measured_rates_are_positive_and_finite():
  bandwidth = roofline.measure_bandwidth(num_bytes=1 << 22, repeats=2)
  assert np.isfinite(bandwidth) and bandwidth > 0
  rate = roofline.measure_matmul_rate(64, 64, 64, repeats=2)
  assert np.isfinite(rate) and rate > 0
