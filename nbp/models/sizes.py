"""Model sizes from one table behind a variant name, each entry overridable by its own field.

A model mixes in `SizedByTable`, sets `SIZES` (variant -> (layers, width,
heads[, kv heads])) and has the fields `variant`, `num_layers`, `width`,
`num_heads` (and `num_kv_heads` when its table has a fourth column); a field
set explicitly overrides the table's entry.
"""

from __future__ import annotations

from typing import ClassVar

SIZE_FIELDS = ("num_layers", "width", "num_heads", "num_kv_heads")  # the table's columns, in order


class SizedByTable:
  """depth / embed_dim / heads / kv_heads of a model: its explicit fields, else `SIZES[variant]`."""

  SIZES: ClassVar[dict[str, tuple[int, ...]]] = {}

  def _size(self, index: int) -> int:
    override = getattr(self, SIZE_FIELDS[index])
    if override is not None:
      return int(override)
    if self.variant not in self.SIZES:
      columns = len(next(iter(self.SIZES.values())))
      raise ValueError(f"config.model.variant={self.variant!r}: choose one of {list(self.SIZES)}, or set "
                       f"{', '.join(SIZE_FIELDS[:columns])}.")
    return self.SIZES[self.variant][index]

  @property
  def depth(self) -> int:
    return self._size(0)

  @property
  def embed_dim(self) -> int:
    return self._size(1)

  @property
  def heads(self) -> int:
    return self._size(2)

  @property
  def kv_heads(self) -> int:
    return self._size(3)
