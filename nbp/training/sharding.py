"""Device mesh and logical-axis sharding, from the config.

Model code names its axes ("batch", "embed", "heads", ...); the config maps
those names onto mesh axes ("data", "fsdp", "tensor") with `axis_rules`. The
same model then runs on one CPU, on 8 fake CPU devices, on a GPU or on a pod by
changing `config.mesh` and `config.axis_rules` alone.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# The default logical-axis rules: batch over every data-parallel axis, weights
# split over fsdp along their embedding axis and over tensor along heads/mlp.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(mesh_config: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves a config mesh such as (("data", -1), ("fsdp", 1)) to names and sizes.

  At most one axis may be -1; it takes all the devices the others leave.
  Raises ValueError, naming `config.mesh`, when the sizes do not match.
  """
  names = tuple(str(name) for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh repeats an axis name: {names}")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh may have at most one axis of size -1, got {tuple(mesh_config)}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh sizes must be positive or -1, got {tuple(mesh_config)}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh {tuple(mesh_config)} does not match the devices: the fixed axes "
          f"need a multiple of {fixed} devices, but there are {num_devices}.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"config.mesh {tuple(mesh_config)} needs {fixed} devices, but there are {num_devices}.")
  return names, tuple(sizes)


def make_mesh(mesh_config: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh of `config.mesh` over `devices` (all devices by default)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(mesh_config, len(devices))
  # Auto axis types: linen's logical constraints need them (jax 0.10 defaults
  # to Explicit).
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def data_parallel_size(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> int:
  """How many ways the "batch" logical axis is split on this mesh."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  if spec is None:
    return 1
  axes = (spec,) if isinstance(spec, str) else tuple(spec)
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_size(batch_size: int, mesh: Mesh, rules, *, name: str = "config.batch_size",
                     grad_accum_steps: int = 1) -> None:
  """Raises ValueError, before any compilation, when the batch does not divide."""
  ways = data_parallel_size(mesh, rules)
  per_step = batch_size // max(grad_accum_steps, 1)
  if batch_size % max(grad_accum_steps, 1):
    raise ValueError(f"{name}={batch_size} is not divisible by config.grad_accum_steps={grad_accum_steps}.")
  if per_step % ways:
    raise ValueError(
        f"{name}={batch_size} (micro-batch {per_step}) does not divide over the data axes "
        f"of the mesh {dict(mesh.shape)}: it must be a multiple of {ways}.")
  if batch_size % jax.process_count():
    raise ValueError(f"{name}={batch_size} does not divide over {jax.process_count()} processes.")


def logical_sharding(abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly LogicallyPartitioned) abstract values.

  Leaf by leaf, so the empty nodes of optax's masks (MaskedNode: the
  optimizer state a frozen parameter keeps, inside its box) stay empty.
  """
  def leaf(x):
    if isinstance(getattr(x, "value", None), optax.MaskedNode):
      return optax.MaskedNode()
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(x), mesh, rules)
  return jax.tree.map(leaf, abstract_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Leading axis of every batch array split over the data axes."""
  return NamedSharding(mesh, PartitionSpec(nn.logical_to_mesh_axes(("batch",), rules)[0]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Stitches each process's part of the batch into one global array per key."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
