"""``infer_spec``: the chains of a model, from its computation."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.discovery import _bind
from ecopt.discovery import _layers
from ecopt.discovery import _trace
from ecopt.discovery import _verify


class InferredSpec(tuple):
  """A spec found by :func:`infer_spec`: a tuple of ``ecopt.Chain``.

  It is an ordinary spec (a sequence of ``Chain``) accepted everywhere a spec
  is, and prints a summary: each chain's layers, hidden sizes and kind
  (``relu``: every hidden level passes a ReLU-family activation; ``linear``:
  none does; ``mixed``), and ``m`` (parameters), ``H`` (hidden nodes) and
  ``dim = m - H``. To edit it, build a new list, e.g.
  ``[c for c in spec if "head" not in c.names[-1]]``.

  Attributes:
    structure: the resolved geometry (``ecopt.structure.resolve``), or None.
    ends: layer name -> why its output is not a hidden level (for the layers
      that end a chain or stand alone); see :meth:`explain`.
    activated: for each chain, for each hidden level, whether it passes a
      ReLU-family activation (empty when unknown).
  """

  structure: Optional[structure_lib.Structure]
  ends: dict[str, str]
  activated: tuple[tuple[bool, ...], ...]

  def __new__(cls, chains: Sequence[spec_lib.Chain] = (), structure=None, ends=None, activated=()):
    self = super().__new__(cls, spec_lib.as_chains(tuple(chains)))
    self.structure = structure
    self.ends = dict(ends or {})
    self.activated = tuple(tuple(a) for a in activated)
    return self

  def __reduce__(self):
    return (InferredSpec, (tuple(self), self.structure, self.ends, self.activated))

  @property
  def chains(self) -> tuple[spec_lib.Chain, ...]:
    return tuple(self)

  def kind(self, index: int) -> str:
    """``"relu"``, ``"linear"`` or ``"mixed"`` for chain ``index``."""
    if index >= len(self.activated):
      return "unknown"
    levels = self.activated[index]
    if all(levels):
      return "relu"
    if not any(levels):
      return "linear"
    linear = [str(k) for k, a in enumerate(levels, start=1) if not a]
    return "mixed (linear levels " + ", ".join(linear) + ")"

  def summary(self) -> str:
    s = self.structure
    if s is None:
      return "\n".join(
          [f"InferredSpec with {len(self)} chain(s)"] + [f"  {c!r}" for c in self]
      )
    lines = [
        f"InferredSpec: {len(self)} chain(s); m = {s.num_params} parameters,"
        f" H = {s.num_hidden} hidden nodes, dim = m - H = {s.dim}"
    ]
    for index, geometry in enumerate(s.chains):
      widths = geometry.widths
      lines.append(f"  {geometry.chain!r}")
      lines.append(
          f"      {self.kind(index)} chain; hidden sizes {tuple(widths[1:-1])} (in"
          f" {widths[0]}, out {widths[-1]}); H = {geometry.num_hidden}, edges ="
          f" {geometry.num_edges}"
      )
    in_chains = {name for chain in self for name in chain.names}
    others = [name for name in self.ends if name not in in_chains]
    if others:
      lines.append(
          "  layers in no chain (their parameters are their own coordinates): "
          + ", ".join(others)
      )
    return "\n".join(lines)

  def explain(self) -> str:
    """The summary, plus why each other layer output is not a hidden level."""
    lines = [self.summary()]
    if self.ends:
      lines.append("  levels that are not hidden:")
      lines += [f"    '{name}': {why}" for name, why in self.ends.items()]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.summary()

  __repr__ = __str__


def infer_spec(
    apply_fn: Any,
    variables: Any,
    *example_args: Any,
    verify: bool = True,
    require_activation: bool = False,
    axis_names: Sequence[str] = (),
    **example_kwargs: Any,
) -> InferredSpec:
  """Finds the ReLU chains of a model from its computation.

  Traces ``apply_fn`` with ``jax.make_jaxpr`` and finds its layers by what
  the computation does with each parameter: a ``dot_general`` operand (input
  features: its contracted axes, outputs: its free ones) or a convolution
  kernel is a kernel, a 1-D parameter multiplied into a value a per-node
  scale, a parameter added to a layer's output its bias; names and layouts do
  not matter (``DenseGeneral``, ``Einsum``, an nnx ``Linear`` with ``w`` and
  ``b``). For every layer it follows symbolically what scaling its output
  nodes by ``c_j > 0`` does. The output level is hidden, linking the layer to
  the next one, when the scaled values pass only through positively
  homogeneous per-node operations (ReLU ``max(x, 0)``, leaky ReLU, max/avg
  pooling, reshapes keeping the nodes together, identity) into exactly one
  contraction with the next layer's kernel over its input axes, and scaling
  that kernel's input rows by ``1/c_j`` leaves every output unchanged. Nested
  ``jit``, ``custom_jvp``/``custom_vjp`` and ``remat`` calls are entered. A
  level ends its chain where its values also flow elsewhere: a residual add,
  a second consumer, a non-homogeneous op (tanh, GELU, softmax, a
  normalisation's statistics), a concatenation with other values, tied
  weights.

  Training-mode calls work as the training loop writes them: linen
  ``apply`` with ``train=True``, ``mutable=["batch_stats"]`` and
  ``rngs={"dropout": key}`` (added if missing), BatchNorm with an
  ``axis_name`` (bound for the trace), nnx modules in ``train()`` mode with
  ``Rngs`` passed positionally or by keyword.

  Args:
    apply_fn: ``apply_fn(variables, *args)`` (Flax linen ``model.apply``), a
      plain ``fn(params, *args)``, or a ``flax.nnx.Module``.
    variables: linen variables (the spec is relative to
      ``variables["params"]``; other collections are held fixed), a params
      pytree for a plain function, or ``None`` for an nnx module (the spec is
      relative to ``nnx.state(model, nnx.Param)``).
    *example_args: example inputs. Array arguments are traced; other values
      are passed as static values.
    verify: check the result with :func:`verify_spec` before returning it.
    require_activation: keep only hidden levels that pass a ReLU-family
      activation (ReLU, leaky ReLU, max pooling): purely linear levels such as
      LayerNorm -> Dense, attention's value -> out projection or a norm ->
      head are scale-invariant too, but left out.
    axis_names: collective axis names to bind (found automatically when the
      model raises an unbound-axis error).
    **example_kwargs: static keyword arguments for ``apply_fn`` (e.g.
      ``train=False``, ``mutable=[...]``, ``rngs=...``).

  Returns:
    An :class:`InferredSpec`: a tuple of ``ecopt.Chain`` in the order the
    chains are computed, which prints a summary (``print(spec)``) and explains
    where chains end (``spec.explain()``). A layer whose leaves or layout
    need naming is an ``ecopt.Layer`` entry.

  Raises:
    ValueError: if ``verify`` finds that the inferred spec changes the
      function (a bug; please report it with the model).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, ecopt
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu,
    ...                        nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> spec = ecopt.infer_spec(model.apply, variables, x)
    >>> spec[0].layers
    ('layers_0', 'layers_2', 'layers_4')
  """
  bound = _bind.bind(apply_fn, variables, example_args, example_kwargs, axis_names)
  t = _trace.trace(bound)
  ordered = sorted(t.layers, key=t.order)
  links: dict[str, _trace.Level] = {}
  ends: dict[str, str] = {}
  for layer in ordered:
    level = _trace.check_level(t, layer)
    if level.consumer is None:
      ends[layer.label] = level.reason
    elif require_activation and not level.activated:
      ends[layer.label] = (
          f"its output reaches '{level.consumer.label}' through no ReLU-family"
          " activation (a purely linear level), left out by"
          " require_activation=True"
      )
    else:
      links[layer.label] = level
  targets: dict[str, list[str]] = {}
  for a, level in links.items():
    targets.setdefault(level.consumer.label, []).append(a)
  for b, sources in targets.items():
    if len(sources) > 1:  # cannot happen for a chain; keep the spec valid
      for a in sources:
        del links[a]
        ends[a] = f"'{b}' also receives the output of {sorted(sources)}"
  fed = {level.consumer.label for level in links.values()}
  chains, activated = [], []
  for layer in ordered:
    if layer.label in fed or layer.label not in links:
      continue
    entries = [_layers.entry(layer, t.paths, t.shapes)]
    flags, current = [], layer
    while current.label in links:
      level = links[current.label]
      entries.append(_layers.entry(level.consumer, t.paths, t.shapes, level.consumer_axes))
      flags.append(level.activated)
      current = level.consumer
    chains.append(spec_lib.Chain(*entries))
    activated.append(tuple(flags))
  kept, kept_flags = [], []
  for chain, flags in zip(chains, activated):
    try:
      structure_lib.resolve(bound.params, chain)
      kept.append(chain)
      kept_flags.append(flags)
    except ValueError as e:
      for name in chain.names:
        ends[name] = f"its chain {chain!r} has a geometry ecopt cannot read: {e}"
  for leaf, why in t.found.skipped.items():
    ends.setdefault("/".join(t.paths[leaf][:-1]) or "/".join(t.paths[leaf]), why)
  structure = structure_lib.resolve(bound.params, kept)
  rank = {layer.label: t.order(layer) for layer in t.layers}
  ordered_ends = dict(sorted(ends.items(), key=lambda item: rank.get(item[0], 1 << 61)))
  spec = InferredSpec(kept, structure, ordered_ends, kept_flags)
  if verify and kept:
    try:
      _verify.verify_bound(bound, spec)
    except ValueError as e:
      raise ValueError(
          f"infer_spec found {list(spec)}, but verify_spec rejects it; this is"
          f" a bug in ecopt's inference, please report it. {e}"
      ) from e
  return spec
