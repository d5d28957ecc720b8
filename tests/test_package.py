"""The package boundary: `import ecopt` loads the library, not its extras."""

import json
import os
import subprocess
import sys

import pytest


def _modules_after(code):
  """Names in sys.modules after running `code` in a fresh interpreter."""
  script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
  proc = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True,
      timeout=120, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return set(json.loads(proc.stdout.splitlines()[-1]))


@pytest.fixture(scope="module")
def after_import():
  return _modules_after("import ecopt")


@pytest.mark.parametrize("name", ["ecopt.zoo", "ecopt.demo", "flax.linen",
                                  "flax.nnx"])
def test_import_ecopt_leaves_extras_unloaded(after_import, name):
  assert "ecopt" in after_import
  assert name not in after_import


def test_zoo_loads_on_first_attribute_access():
  loaded = _modules_after(
      "import ecopt\nassert ecopt.zoo.linen.__name__ == 'ecopt.zoo.linen'")
  assert {"ecopt.zoo", "ecopt.zoo.linen"} <= loaded
  assert "ecopt.demo" not in loaded


def test_unknown_attribute_is_an_attribute_error():
  import ecopt  # pylint: disable=g-import-not-at-top
  assert not hasattr(ecopt, "no_such_name")
  with pytest.raises(AttributeError, match="no_such_name"):
    ecopt.no_such_name  # pylint: disable=pointless-statement
