"""benchmarks/overhead keeps working: its report and its HLO parsing.

CI never runs the benchmark itself (timings belong to benchmarks, not to
tests), so a short run here keeps the script from rotting: every pair the
issue asks for must be timed, each ratio must fit the times reported, the
memory and compile entries must be there, and each target's verdict must
follow from its value. No timing is asserted.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.overhead import report  # noqa: E402
from benchmarks.overhead import sharding  # noqa: E402


def test_collectives_are_counted_with_their_largest_operand():
  hlo = "\n".join([
      "  %all-reduce.4 = (f32[10,103]{1,0}, f32[1024]{0}) all-reduce(%a, %b),"
      " channel_id=1",
      "  %all-gather.3 = f32[1024]{0} all-gather(%c), channel_id=2",
      "  %all-gather-start = (f32[256]{0}, f32[1024]{0}) all-gather-start(%d)",
      "  %collective-permute.1 = f32[6]{0} collective-permute(%e)",
      "  %add = f32[1024]{0} add(%f, %g)",
  ])
  found = sharding.collectives_in(hlo)
  assert found["all-reduce"] == {
      "count": 1, "max_elements": 1030, "total_elements": 2054}
  assert found["all-gather"]["count"] == 2
  assert found["all-gather"]["max_elements"] == 1024
  assert found["collective-permute"]["total_elements"] == 6
  assert "add" not in found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "overhead.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.overhead", "--quick", "--models",
       "mlp_a", "--no-zoo", "--no-scaling", "--no-sharded", "--rounds", "2", "--compile-reps", "1",
       "--update-inner", "1", "--step-inner", "1", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_every_pair_is_timed_and_its_ratio_fits_its_times(quick_run):
  results, _ = quick_run
  model = results["models"]["mlp_a"]
  # The pairs issue #6 names: G-SGD against SGD with the same momentum,
  # g_space(adam) against adam, path_sgd against SGD; the update alone also
  # against `w - lr * g`.
  step_pairs = [("g_sgd_m", "sgd_m"), ("g_adam", "adam"), ("path_sgd", "sgd")]
  update_pairs = step_pairs + [("g_sgd", "sgd")]
  for part, pairs in (("step", step_pairs), ("update", update_pairs)):
    times, ratios = model[part]["times"], model[part]["ratios"]
    for new, base in pairs:
      key = f"{new}/{base}"
      assert key in ratios, (part, key)
      for clock in ("wall", "cpu"):
        r = ratios[key][clock]
        assert r["n"] == 2 and 0 < r["q25"] <= r["median"] <= r["q75"]
      # Each round's quotient new/base lies between the smallest new time
      # over the largest base time and the other way round (with two rounds
      # the quartiles give those extremes back exactly), so the median
      # ratio does too: this catches a ratio taken the wrong way round or
      # from the wrong pair, not whether rounds were paired.
      a_new, b_new = _extremes(times[new]["wall_ms"])
      a_base, b_base = _extremes(times[base]["wall_ms"])
      ratio = ratios[key]["wall"]["median"]
      assert a_new / b_base * (1 - 1e-9) <= ratio <= b_new / a_base * (1 + 1e-9)


def _extremes(stats):
  """Min and max of two samples from their linearly interpolated quartiles."""
  q25, q75 = stats["q25"], stats["q75"]
  return 1.5 * q25 - 0.5 * q75, 1.5 * q75 - 0.5 * q25


def test_memory_and_compile_entries_are_reported(quick_run):
  results, _ = quick_run
  model = results["models"]["mlp_a"]
  assert model["param_bytes"] == 4 * model["num_params"]  # float32
  for pair in ("g_sgd_m/sgd_m", "g_adam/adam"):
    mem = model["extra_memory"][pair]
    assert mem["vs_param_bytes"] == pytest.approx(
        mem["step_temp_extra_bytes"] / model["param_bytes"])
    assert math.isfinite(model["compile_ratios"][pair]["total"])
    assert model["compile_ratios"][pair]["total"] > 0


def test_target_verdicts_follow_their_values(quick_run):
  results, stdout = quick_run
  rows = results["targets"]
  limits = set(report.TARGETS.values())
  kinds = {row["target"] for row in rows}
  assert kinds == {"full step vs optax", "update alone vs w - lr*g",
                   "extra memory (step temp) / param bytes",
                   "compile time (trace+compile)"}
  for row in rows:
    assert row["limit"] in limits
    assert row["met"] == (row.get("wall", row.get("value")) <= row["limit"])
  # The markdown report carries the same verdicts.
  assert "### Targets" in stdout
  assert stdout.count("| yes |") + stdout.count("| NO |") == len(rows)
