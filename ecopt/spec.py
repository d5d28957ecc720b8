"""Structure specs: which layers of a params pytree form a ReLU chain."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax

KINDS = ("auto", "dense", "conv", "scale")


def _as_path(path: Any) -> tuple[str, ...]:
  """``"a/b"`` -> ``("a", "b")``; a tuple names its keys as they are."""
  if isinstance(path, str):
    return tuple(part for part in path.split("/") if part)
  if isinstance(path, tuple) and all(isinstance(p, str) and p for p in path):
    return path
  raise ValueError(
      "A layer path is a '/'-separated string or a tuple of key strings (for"
      f" keys that contain '/'), got {path!r}."
  )


def _as_axes(axes: Any, what: str) -> Optional[tuple[int, ...]]:
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not axes or not all(isinstance(a, int) for a in axes):
    raise ValueError(f"Layer {what} must be a non-empty tuple of ints, got {axes!r}.")
  return axes


@dataclasses.dataclass(frozen=True, init=False)
class Layer:
  """One chain layer, with its leaves and its reading of the kernel declared.

  A plain string in a ``Chain`` is ``Layer(path)``: a ``kernel`` leaf (Dense
  ``(in, out)``, or a Flax-layout conv ``(*window, in, out)``) or a
  normalisation ``scale``, and a ``bias`` if there is one. Write a ``Layer``
  when the leaves have other names or the kernel another layout:

  * ``kind="dense"``: every kernel axis is an input or an output feature
    axis, e.g. a ``DenseGeneral`` kernel ``(in, heads, dim)`` with
    ``in_axes=(0,), out_axes=(1, 2)`` (its bias is ``(heads, dim)``), or an
    ``Einsum`` kernel ``(out, in)`` with ``in_axes=(1,), out_axes=(0,)``.
  * ``kind="conv"``: the axes not in ``in_axes``/``out_axes`` are the window
    (defaults: Flax's ``(*window, in, out)``).
  * ``kind="scale"``: a per-node affine scale (BatchNorm, LayerNorm), one
    edge per node.

  The nodes of a multi-axis feature group are numbered row-major over its
  axes in the order given. ``infer_spec`` writes these entries itself.

  Args:
    path: the module's path, ``"enc/dense"`` or a tuple of keys
      (``("enc/dense",)`` names one key that contains ``/``).
    kernel: the kernel's leaf name under ``path`` (default ``"kernel"``, or
      ``"scale"``).
    bias: the bias leaf's name; ``None`` for none. The default ``"bias"`` is
      used if present; any other name must exist.
    kind: ``"auto"``, ``"dense"``, ``"conv"`` or ``"scale"``.
    in_axes: the kernel's input-feature axes.
    out_axes: the kernel's output-feature axes.

  Example:
    >>> import ecopt
    >>> ecopt.Layer("mlp/fc1", kernel="w", bias="b", kind="dense").name
    'mlp/fc1'
  """

  path: tuple[str, ...]
  kernel: Optional[str]
  bias: Optional[str]
  kind: str
  in_axes: Optional[tuple[int, ...]]
  out_axes: Optional[tuple[int, ...]]

  def __init__(
      self,
      path: Union[str, tuple[str, ...]],
      kernel: Optional[str] = None,
      bias: Optional[str] = "bias",
      *,
      kind: str = "auto",
      in_axes: Union[None, int, Sequence[int]] = None,
      out_axes: Union[None, int, Sequence[int]] = None,
  ):
    path = _as_path(path)
    if not path:
      raise ValueError("A layer path must not be empty.")
    if kind not in KINDS:
      raise ValueError(f"Layer '{'/'.join(path)}': kind must be one of {KINDS}, got {kind!r}.")
    for name, value in (("kernel", kernel), ("bias", bias)):
      if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"Layer '{'/'.join(path)}': {name} must be a leaf name, got {value!r}.")
    in_axes, out_axes = _as_axes(in_axes, "in_axes"), _as_axes(out_axes, "out_axes")
    if kind in ("auto", "scale") and (in_axes or out_axes):
      raise ValueError(
          f"Layer '{'/'.join(path)}': in_axes/out_axes need kind='dense' or"
          f" kind='conv', got kind={kind!r}."
      )
    for field, value in zip(
        ("path", "kernel", "bias", "kind", "in_axes", "out_axes"),
        (path, kernel, bias, kind, in_axes, out_axes),
    ):
      object.__setattr__(self, field, value)

  @property
  def name(self) -> str:
    """The path as written in messages (``"a/b"``, or the tuple's repr)."""
    if any("/" in part for part in self.path):
      return repr(self.path)
    return "/".join(self.path)

  @property
  def is_default(self) -> bool:
    """True when the plain string ``name`` means the same layer."""
    return (self.kernel, self.bias, self.kind) == (None, "bias", "auto") and not any(
        "/" in part for part in self.path
    )

  def __repr__(self) -> str:
    args = [repr(self.name if not any("/" in p for p in self.path) else self.path)]
    if self.kernel is not None:
      args.append(f"kernel={self.kernel!r}")
    if self.bias != "bias":
      args.append(f"bias={self.bias!r}")
    if self.kind != "auto":
      args.append(f"kind={self.kind!r}")
    for field in ("in_axes", "out_axes"):
      if getattr(self, field) is not None:
        args.append(f"{field}={getattr(self, field)!r}")
    return "Layer(" + ", ".join(args) + ")"


LayerLike = Union[str, tuple[str, ...], Layer]


def as_layer(entry: LayerLike) -> Layer:
  """A chain entry (path string, key tuple or ``Layer``) as a ``Layer``."""
  return entry if isinstance(entry, Layer) else Layer(entry)


@dataclasses.dataclass(frozen=True, init=False)
class Chain:
  """The ordered layers of one ReLU chain.

  A chain ``Chain(l_1, ..., l_n)`` says that the output of layer ``l_k``
  reaches layer ``l_{k+1}`` only through positively homogeneous per-node
  operations (ReLU, leaky ReLU, max/avg pooling, reshape, identity). The
  levels between consecutive layers are the chain's hidden nodes; the input of
  ``l_1`` and the output of ``l_n`` are boundaries and are never rescaled.

  Each layer is a ``/``-separated path into the params pytree (``"Dense_0"``,
  ``"block/Dense_1"``, ``"layers/0"`` for an ``nnx`` list), a tuple of keys
  (``("enc/dense",)`` for a key containing ``/``), or an :class:`ecopt.Layer`
  naming its leaves and kernel layout. A path names a mapping that holds
  either a ``kernel`` (Dense or Conv, Flax layout) or a normalisation
  ``scale`` (a diagonal layer), and optionally a ``bias``.

  Example:
    >>> import ecopt
    >>> chain = ecopt.Chain("Dense_0", "Dense_1", "Dense_2")
    >>> chain.layers
    ('Dense_0', 'Dense_1', 'Dense_2')
  """

  layers: tuple[LayerLike, ...]

  def __init__(self, *layers: LayerLike):
    if len(layers) == 1 and isinstance(layers[0], list):
      layers = tuple(layers[0])  # Chain(["a", "b"]) is accepted too.
    entries = []
    for layer in layers:
      try:
        entries.append(as_layer(layer))
      except ValueError as e:
        raise ValueError(
            f"Chain layers are path strings, key tuples or ecopt.Layer; got"
            f" {layer!r} in {layers!r}: {e}"
        ) from None
    if len(layers) < 2:
      raise ValueError(
          f"A chain needs at least two layers (one hidden level), got"
          f" {len(layers)}: {layers!r}. A single layer has no hidden node; leave"
          " it out of the spec and it is optimized as its own coordinates."
      )
    if len({(e.path, e.kernel) for e in entries}) != len(entries):
      raise ValueError(f"A chain names the same layer twice: {layers!r}.")
    object.__setattr__(self, "layers", tuple(layers))

  @property
  def entries(self) -> tuple[Layer, ...]:
    """The layers as :class:`Layer` objects."""
    return tuple(as_layer(layer) for layer in self.layers)

  @property
  def names(self) -> tuple[str, ...]:
    """The layers' paths as written in messages."""
    return tuple(e.name for e in self.entries)

  def __len__(self) -> int:
    return len(self.layers)

  def __iter__(self):
    return iter(self.layers)

  def __repr__(self) -> str:
    return "Chain(" + ", ".join(repr(layer) for layer in self.layers) + ")"


Spec = Union[Chain, Sequence[Chain]]


def as_chains(spec: Spec) -> tuple[Chain, ...]:
  """Normalises a spec (one Chain or a sequence of Chains) to a tuple."""
  if isinstance(spec, Chain):
    return (spec,)
  if isinstance(spec, str) or not isinstance(spec, Sequence):
    raise ValueError(
        "A spec is an ecopt.Chain or a sequence of ecopt.Chain, got"
        f" {type(spec).__name__}: {spec!r}."
    )
  chains = tuple(spec)
  for chain in chains:
    if not isinstance(chain, Chain):
      raise ValueError(
          "A spec is an ecopt.Chain or a sequence of ecopt.Chain; it contains"
          f" {type(chain).__name__}: {chain!r}."
      )
  return chains


def key_name(entry: Any) -> str:
  """The string form of one pytree key-path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def key_path(path: Sequence[Any]) -> tuple[str, ...]:
  """A pytree key path as a tuple of strings.

  A trailing ``.value`` attribute (an ``nnx.Variable`` holding the array) is
  dropped, so a tree of Variables and its pure-array counterpart have the
  same paths: ``nnx.Optimizer`` inits with the one and updates with the other.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return tuple(key_name(entry) for entry in path)


def layer_key(layer: LayerLike) -> tuple[str, ...]:
  """A layer path (``"a/b"``, a key tuple or a ``Layer``) as a key tuple."""
  if isinstance(layer, str):
    return tuple(part for part in layer.split("/") if part)
  return as_layer(layer).path


def flatten_with_names(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """Flattens ``tree`` into (string key paths, leaves, treedef)."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [key_path(path) for path, _ in with_path]
  leaves = [leaf for _, leaf in with_path]
  return paths, leaves, treedef
