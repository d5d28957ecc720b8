"""Test configuration: float64 for exact oracles, and one tier per test.

Tests that check float32 or bfloat16 behaviour create their arrays with an
explicit dtype.

Every test gets exactly one tier marker, from where it lives, so that
`pytest -m unit` (or property, conformance, integration) runs one tier and a
plain `pytest` runs them all:

- integration: tests/integration/ (notebooks, the demo, the README, a
  benchmark smoke run; slow, run whole programs);
- conformance: tests/test_conformance.py (every transformation against the
  same optax checks);
- property: hypothesis-driven tests;
- unit: everything else.
"""

import pathlib

import jax
import pytest

jax.config.update("jax_enable_x64", True)

_INTEGRATION = pathlib.Path(__file__).resolve().parent / "integration"


def _tier(item):
  path = pathlib.Path(str(item.fspath)).resolve()
  if _INTEGRATION in path.parents:
    return "integration"
  if path.stem == "test_conformance":
    return "conformance"
  if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
    return "property"
  return "unit"


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    item.add_marker(getattr(pytest.mark, _tier(item)))
