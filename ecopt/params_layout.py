"""The params layout an optimizer state remembers from ``init``.

``update`` compares it with the params it is given so that a params tree that
changed since ``init`` (other leaves, other shapes, local shards inside
``shard_map``) is a clear ValueError rather than a wrong step. It carries no
arrays, so it costs nothing in a state and checkpoints restore it from their
target.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
  from ecopt.structure import Structure


@dataclasses.dataclass(frozen=True)
class ParamsLayout:
  """Leaf paths and shapes of a params tree, kept as static pytree metadata.

  A pytree node without leaves (``jax.tree_util.register_static``): it lives
  in an optimizer state at no cost, is static under ``jit``, and checkpoint
  libraries skip it and restore it from the target state (orbax; and
  ``flax.serialization`` once flax is imported). ``update`` uses it to report
  a params tree that changed since ``init``.
  """

  paths: tuple[tuple[str, ...], ...]
  shapes: tuple[tuple[int, ...], ...]

  @classmethod
  def of(cls, structure: Structure) -> "ParamsLayout":
    _register_flax_serialization()
    return cls(structure.paths, structure.shapes)

  def check(self, structure: Structure) -> None:
    """Raises ValueError naming the leaves that differ from ``structure``."""
    _register_flax_serialization()
    if (self.paths, self.shapes) == (structure.paths, structure.shapes):
      return
    old = dict(zip(self.paths, self.shapes))
    new = dict(zip(structure.paths, structure.shapes))
    changes = [
        f"'{_path_name(p)}' had shape {old[p]} at init and has {new[p]} now"
        for p in structure.paths
        if p in old and old[p] != new[p]
    ]
    missing = [f"'{_path_name(p)}' {s}" for p, s in old.items() if p not in new]
    added = [f"'{_path_name(p)}' {s}" for p, s in new.items() if p not in old]
    if missing:
      changes.append("leaves gone: " + ", ".join(missing[:5]))
    if added:
      changes.append("new leaves: " + ", ".join(added[:5]))
    if not changes:
      changes.append("the leaves are in a different order")
    sharded = any(
        p in old and _is_local_shard(old[p], new[p]) for p in structure.paths
    )
    raise ValueError(
        "The params tree changed between init and update ("
        + "; ".join(changes)
        + "). "
        + (_SHARD_MAP_HINT if sharded else "Call init again with the new params.")
    )


_SHARD_MAP_HINT = (
    "The shapes shrank by whole factors, as for local shards inside"
    " jax.shard_map (or pmap) with hidden units split across devices: G-space"
    " couples every node of a chain, so the update must see whole chains, and"
    " G-SGD on each local sub-network would be silently wrong. Shard with"
    " jax.jit instead, e.g. params = jax.device_put(params,"
    " NamedSharding(mesh, PartitionSpec(None, 'model'))) and"
    " jax.jit(optimizer.update): ecopt then sees global shapes and XLA"
    " partitions the update; or replicate each chain's parameters inside"
    " shard_map."
)


def _path_name(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _is_local_shard(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
  """True when ``new`` divides ``old`` axis by axis and is smaller."""
  return (
      len(old) == len(new)
      and old != new
      and all(n > 0 and o % n == 0 for o, n in zip(old, new))
  )


jax.tree_util.register_static(ParamsLayout)


def _register_flax_serialization() -> None:
  """Lets flax.serialization skip ParamsLayout (restored from the target).

  Done lazily so ecopt does not import flax; every Flax user has imported it
  by the time an optimizer state exists.
  """
  global _FLAX_REGISTERED
  if _FLAX_REGISTERED or "flax.serialization" not in sys.modules:
    return
  sys.modules["flax.serialization"].register_serialization_state(
      ParamsLayout,
      lambda layout: {},
      lambda layout, state: layout,
      override=True,
  )
  _FLAX_REGISTERED = True


_FLAX_REGISTERED = False
