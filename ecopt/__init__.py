"""ecopt: optimize ReLU networks in their positively scale-invariant space.

G-SGD and any optax optimizer on basis-path values (Meng et al., ICLR 2019),
as pure-functional optax transformations for Flax params.
"""

from ecopt import batchnorm
from ecopt.baselines import path_kappa
from ecopt.baselines import path_sgd
from ecopt.baselines import scale_by_path_norm
from ecopt.batchnorm import scale_by_incoming_norm
from ecopt.basis import basis_path_values
from ecopt.basis import canonicalize
from ecopt.basis import free_mask
from ecopt.basis import g_space_dim
from ecopt.basis import rescale
from ecopt.basis import scale_nodes
from ecopt.basis import skeleton_init
from ecopt.discovery import InferredSpec
from ecopt.discovery import infer_spec
from ecopt.discovery import verify_spec
from ecopt.regularization import AddBasisPathDecayState
from ecopt.regularization import add_basis_path_decay
from ecopt.regularization import basis_path_regularizer
from ecopt.spec import Chain
from ecopt.spec import Layer
from ecopt.spec import Spec
from ecopt.transform import GSpaceState
from ecopt.aliases import g_adam
from ecopt.aliases import g_adamw
from ecopt.aliases import g_rmsprop
from ecopt.aliases import g_sgd
from ecopt.aliases import path_decay_mask
from ecopt.transform import g_space

__version__ = "0.1.0"


def __getattr__(name):
  # The zoo imports flax.linen and flax.nnx (about 2 s); it loads on first
  # use of `ecopt.zoo`, so `import ecopt` stays light.
  if name == "zoo":
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module("ecopt.zoo")
  raise AttributeError(f"module 'ecopt' has no attribute {name!r}")


__all__ = (
    "AddBasisPathDecayState",
    "Chain",
    "GSpaceState",
    "InferredSpec",
    "Layer",
    "Spec",
    "add_basis_path_decay",
    "basis_path_regularizer",
    "basis_path_values",
    "batchnorm",
    "canonicalize",
    "free_mask",
    "g_adam",
    "g_adamw",
    "g_rmsprop",
    "g_sgd",
    "g_space",
    "g_space_dim",
    "infer_spec",
    "path_decay_mask",
    "path_kappa",
    "path_sgd",
    "rescale",
    "scale_by_incoming_norm",
    "scale_by_path_norm",
    "scale_nodes",
    "skeleton_init",
    "verify_spec",
    "zoo",
)
