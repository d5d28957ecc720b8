"""Structure discovery: infer a spec from a model's function, and check a spec.

A spec tells ecopt which layers form ReLU chains. A wrong spec silently
optimizes in the wrong space, so ecopt offers two tools:

* :func:`verify_spec` checks a spec numerically: it rescales the hidden nodes
  of every chain by random positive factors and checks that the model's outputs
  do not change.
* :func:`infer_spec` finds the spec: it traces the model with
  ``jax.make_jaxpr`` and follows, symbolically, what a node scaling does to
  every value of the computation.

How inference works. Layers are found by what the computation does with
each parameter (``_layers``): an operand of a ``dot_general`` or a
convolution's kernel is a layer kernel (its contracted axes are the input
features, its free axes the output features, whatever its name or layout), a
1-D parameter multiplied into a value is a per-node scale, a parameter added
to a layer's output is its bias. Take such a layer ``A`` and scale its output
node ``j`` by ``c_j > 0``: the kernel's column ``j`` and ``bias[j]`` are
multiplied by ``c_j``. Every value of the jaxpr is then abstractly one of: unchanged;
multiplied by ``c_j^p`` for the node ``j = index mod h`` along one axis
(``p = +-1``); or a known zero. Positively homogeneous per-node operations
(``max(x, 0)`` as in ReLU, leaky ReLU's ``select``, max/sum/avg pooling,
reshapes that keep the channels innermost, transposes, multiplication by an
unchanged value, ...) carry a scaled value on. The level is a **hidden level**
when the scaled values reach exactly one contraction over their node axis with
another layer's kernel ``B`` (a ``dot_general`` or ``conv_general_dilated``
over its input-feature axis), and nothing else: not the output, not a residual
``add`` with an unchanged value, not a second consumer, not ``tanh``, ``erf``
(GELU), a normalisation's mean, ... A second pass scales ``B``'s kernel rows by
``1/c_j`` as well and requires every output of the function to be unchanged,
which also rules out tied or shared weights. Hidden levels ``A -> B`` linked
end to end are the chains.

Conventions for ``apply_fn`` and ``variables`` (the same for both functions):

* Flax linen: ``apply_fn(variables, *args)`` (e.g. ``model.apply``) with
  ``variables = {"params": ..., "batch_stats": ...}``. The spec is relative to
  ``variables["params"]``. The other collections are inputs that node scaling
  does not change; inference never relies on their current values (fresh
  BatchNorm statistics are exact zeros and ones).
* Flax nnx: pass the module itself and ``variables=None``:
  ``infer_spec(model, None, x)``. The spec is relative to
  ``nnx.state(model, nnx.Param)`` (layer paths like ``"layers/0"``); the other
  state (batch statistics, RNG counters) is treated like linen's other
  collections. The module's own mode applies (``model.eval()`` /
  ``model.train()``), or pass e.g. ``train=False`` as a keyword argument if
  its ``__call__`` takes one.
* A plain function: ``apply_fn(params, *args)`` where ``params`` (any pytree
  that is not a mapping with a ``"params"`` entry) is the params itself.

Arguments in ``example_args`` that are arrays (or pytrees of arrays) are
traced; other values (Python numbers, flags) and keyword arguments are passed
as static values. Use ``functools.partial(model.apply, train=False)`` or a
keyword argument to pick inference or training mode.

Normalisation layers. A BatchNorm (or LayerNorm/GroupNorm/RMSNorm) affine
``x_hat * scale + bias`` is a diagonal layer (``g-space.md`` sections 1 and
8): scaling ``scale[j]`` and ``bias[j]`` by ``c_j`` scales output channel
``j``, so a normalisation followed by ReLU starts a chain. The layer *before*
the normalisation ends its chain. In inference mode
``(x - mean) * rsqrt(var + eps)`` uses stored statistics, so scaling ``x``
changes the output. In training mode the batch statistics absorb the factor
(degree 0, and only up to ``eps``) instead of passing it on, so the level is
not hidden either. Both modes give the same chains.

Limitations (inference is conservative: anything it does not recognise ends a
chain, and the numerical check guards the rest):

* A kernel contracted with a batch dimension (stacked members of an
  ensemble written without ``vmap``) and grouped/depthwise convolutions are
  not chain layers. A bias must sit beside its kernel in the params tree.
* A reshape must keep a level's nodes together (or innermost, as a
  channels-last flatten does); a flatten of a channels-first layout ends a
  chain.
* Control flow (``scan``, ``while``, ``cond``) and unknown primitives end a
  chain when a scaled value reaches them.
* :func:`verify_spec` is numerical, at the example inputs: a level whose ReLUs
  are all inactive there is not tested. Use a realistic batch.

References:
  Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
  Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713), sections 3-4 and
  Appendix 11.2 (residual and BatchNorm networks).
"""

from ecopt.discovery._infer import InferredSpec
from ecopt.discovery._infer import infer_spec
from ecopt.discovery._verify import verify_spec

__all__ = ("InferredSpec", "infer_spec", "verify_spec")
