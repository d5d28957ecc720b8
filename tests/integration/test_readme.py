"""README.md stays true: its python code runs, its commands and API list hold."""

import pathlib
import re
import subprocess
import sys

import pytest

import ecopt

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _text():
  return README.read_text(encoding="utf-8")


def _python_blocks(text):
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_quickstart_commands():
  text = _text()
  blocks = re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", text, flags=re.M | re.S)
  lines = {line.strip() for block in blocks for line in block.splitlines()}
  assert 'pip install -e ".[examples]" && python -m ecopt.demo' in lines
  assert 'pip install -e ".[test]" && pytest' in lines


def test_every_public_name_is_in_the_api_list():
  text = _text()
  api = text[text.index("## API"):]
  missing = [name for name in ecopt.__all__ if f"`{name}" not in api
             and f"ecopt.{name}" not in api]
  assert not missing, f"public names missing from README's API list: {missing}"


def test_python_blocks_run(tmp_path):
  """Runs the README's python blocks in order, in a fresh interpreter.

  A fresh process (not this one) so the code runs as a user would run it:
  float32 defaults, no x64 (conftest enables x64 in this process).
  """
  blocks = _python_blocks(_text())
  assert len(blocks) >= 2, "expected the usage example and the rescaling example"
  script = tmp_path / "readme_example.py"
  script.write_text("\n".join(blocks), encoding="utf-8")
  proc = subprocess.run(
      [sys.executable, str(script)], cwd=tmp_path, capture_output=True,
      text=True, timeout=900,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout
  loss = float(re.search(r"loss after 200 steps: (\S+)", out).group(1))
  assert loss < 0.5, out  # ln(10) = 2.3 at chance
  gap = {
      name: float(m)
      for name, m in re.findall(r"^(G-SGD|SGD): largest logit difference.*: (\S+)$",
                                out, flags=re.M)
  }
  assert set(gap) == {"G-SGD", "SGD"}, out
  # G-SGD's runs from two node-rescaled copies stay together (float32
  # rounding only); SGD's drift apart.
  assert gap["G-SGD"] < 1e-2, out
  assert gap["SGD"] > 30 * gap["G-SGD"], out
