"""What G-space optimization costs beyond back-propagation, measured.

Pairs of optimizers run in the same process, interleaved round by round in
a shuffled order, so drifting machine load hits both sides of a pair alike:
``ecopt.g_sgd`` against ``optax.sgd`` (momentum 0.9, and none),
``ecopt.g_space(optax.adam)`` against ``optax.adam``, and ``ecopt.path_sgd``
against ``optax.sgd``. The method and the current tables are in
``benchmarks/README.md``; why the update is built the way it is, in
``docs/performance.md``.

Modules:

- :mod:`.models`: the benchmarked models, optimizers and pairs;
- :mod:`.timing`: jitted steps and updates with donated carries, the
  interleaved timer and its same-round ratios;
- :mod:`.compile_memory`: trace + compile times and XLA's memory analysis;
- :mod:`.sharding`: the sharded run (in a child process) and the collectives
  counted in its HLO;
- :mod:`.report`: machine facts, targets and their verdicts, the markdown
  tables;
- :mod:`.run`: what one run measures, and the command line.

Usage, from the repository root::

  python -m benchmarks.overhead --quick     # small models, a smoke run
  python -m benchmarks.overhead --readme    # full run; rewrites the tables

The one constraint on import order lives in :func:`.sharding.run_child`: XLA
fixes the number of host devices when its CPU backend starts, so the sharded
run is a fresh process that receives ``XLA_FLAGS`` in its environment before
it starts. Nothing else depends on when jax is imported. This ``__init__``
imports nothing, so that ``import benchmarks.overhead`` stays cheap.
"""
