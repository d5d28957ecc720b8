"""The machine, the targets and their verdicts, and the markdown tables."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess

import flax
import jax
import jaxlib
import numpy as np
import optax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- overhead:begin -->", "<!-- overhead:end -->"

TARGETS = {
    "step_ratio": 1.03,
    "update_ratio_vs_sgd": 2.0,
    "extra_memory_vs_params": 1.0,
    "compile_ratio": 1.5,
}


def _git(*args):
  try:
    return subprocess.run(["git", *args], cwd=README.parent.parent,
                          capture_output=True, text=True,
                          check=False).stdout
  except OSError:
    return None


def _cpu_name():
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def load_average():
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info():
  """Hardware, software versions, commit and load of this run."""
  commit = _git("rev-parse", "--short", "HEAD")
  status = _git("status", "--short", "--", "ecopt")
  dev = jax.devices()[0]
  return {
      "git_commit": commit.strip() if commit is not None else None,
      "ecopt_files_modified_since_commit": (
          None if status is None else
          [l[3:] for l in status.splitlines() if l.startswith(" M")]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu": _cpu_name(),
      "cpu_count": os.cpu_count(),
      "load_average": load_average(),
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "numpy": np.__version__,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
  }


def check_targets(results):
  """Each target per model and pair, with its value and a verdict."""
  rows = []
  models = results["models"]
  for pair in ("g_sgd_m/sgd_m", "g_adam/adam"):
    for name, m in models.items():
      r = m["step"]["ratios"].get(pair)
      if r:
        rows.append({"target": "full step vs optax", "pair": pair,
                     "model": name, "wall": r["wall"]["median"],
                     "cpu": r["cpu"]["median"],
                     "limit": TARGETS["step_ratio"]})
  for name, m in models.items():
    r = m["update"]["ratios"].get("g_sgd/sgd")
    if r:
      rows.append({"target": "update alone vs w - lr*g", "pair": "g_sgd/sgd",
                   "model": name, "wall": r["wall"]["median"],
                   "cpu": r["cpu"]["median"],
                   "limit": TARGETS["update_ratio_vs_sgd"]})
  for name, m in models.items():
    for pair in ("g_sgd_m/sgd_m", "g_adam/adam"):
      e = m["extra_memory"].get(pair)
      if e and "step_temp_extra_bytes" in e:
        rows.append({"target": "extra memory (step temp) / param bytes",
                     "pair": pair, "model": name,
                     "value": e["vs_param_bytes"],
                     "limit": TARGETS["extra_memory_vs_params"]})
      c = m["compile_ratios"].get(pair)
      if c:
        rows.append({"target": "compile time (trace+compile)", "pair": pair,
                     "model": name, "value": c["total"],
                     "limit": TARGETS["compile_ratio"]})
  for row in rows:
    row["met"] = bool(row.get("wall", row.get("value")) <= row["limit"])
  return rows


def markdown(results):
  """The run as markdown: machine, targets, then one table per part."""
  info = results["machine"]
  lines = []
  w = lines.append
  w(f"Machine: {info['cpu']}, {info['cpu_count']} cores, {info['platform']};"
    f" backend {info['backend']} ({info['device']}).")
  w(f"Versions: Python {info['python']}, jax {info['jax']}, jaxlib"
    f" {info['jaxlib']}, optax {info['optax']}, flax {info['flax']},"
    f" numpy {info['numpy']}.")
  w(f"ecopt at commit {info.get('git_commit')} (files modified in the working"
    f" tree: {info.get('ecopt_files_modified_since_commit')}).")
  w(f"Run: {info['date']}, mode `{results['mode']}`, load average at start"
    f" {info['load_average']}, at end {results.get('load_average_end')}.")
  w("")
  w("Ratios are per-round same-run ratios (new / base), median over rounds"
    " with [q25, q75]; wall clock, then process CPU time.")
  w("")
  w("### Targets")
  w("")
  w("| target | pair | model | measured (wall) | cpu | limit | met |")
  w("| --- | --- | --- | --- | --- | --- | --- |")
  for row in results["targets"]:
    wall = row.get("wall", row.get("value"))
    cpu = row.get("cpu")
    w(f"| {row['target']} | {row['pair']} | {row['model']} | {wall:.3f} |"
      f" {'' if cpu is None else f'{cpu:.3f}'} | {row['limit']} |"
      f" {'yes' if row['met'] else 'NO'} |")
  w("")
  for kind, title in (("step", "Full step (loss, grad, update, apply)"),
                      ("update", "Update alone (update + apply)")):
    w(f"### {title}")
    w("")
    w("| model | pair | new ms (wall) | base ms (wall) | ratio wall [q25, q75] |"
      " ratio cpu [q25, q75] |")
    w("| --- | --- | --- | --- | --- | --- |")
    for mname, m in results["models"].items():
      times = m[kind]["times"]
      for pair, r in m[kind]["ratios"].items():
        new, base = pair.split("/")
        rw, rc = r["wall"], r["cpu"]
        w(f"| {mname} | {pair} | {times[new]['wall_ms']['median']:.2f} |"
          f" {times[base]['wall_ms']['median']:.2f} |"
          f" {rw['median']:.3f} [{rw['q25']:.3f}, {rw['q75']:.3f}] |"
          f" {rc['median']:.3f} [{rc['q25']:.3f}, {rc['q75']:.3f}] |")
    w("")
  w("### Memory and compile time")
  w("")
  w("| model | pair | param MB | extra step temp MB (x params) |"
    " extra update temp MB (x params) | compile new s | compile base s |"
    " ratio |")
  w("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for mname, m in results["models"].items():
    pb = m["param_bytes"]
    for pair, c in m["compile_ratios"].items():
      new, base = pair.split("/")
      e = m["extra_memory"].get(pair, {})
      st = e.get("step_temp_extra_bytes")
      up = e.get("update_temp_extra_bytes")
      fmt = lambda b: "" if b is None else f"{b / 1e6:.2f} ({b / pb:.3f})"
      w(f"| {mname} | {pair} | {pb / 1e6:.1f} | {fmt(st)} | {fmt(up)} |"
        f" {m['compile'][new]['total_s']:.2f} |"
        f" {m['compile'][base]['total_s']:.2f} | {c['total']:.2f} |")
  w("")
  if results.get("scaling"):
    w("### Update cost vs size (MLP 784-h-h-h-10, update alone)")
    w("")
    w("| h | params m | g_sgd ns/param | sgd ns/param | ratio wall |")
    w("| --- | --- | --- | --- | --- |")
    for row in results["scaling"]:
      w(f"| {row['hidden']} | {row['num_params']} |"
        f" {row['g_sgd_ns_per_param']:.3f} | {row['sgd_ns_per_param']:.3f} |"
        f" {row['ratios']['g_sgd/sgd']['wall']['median']:.3f} |")
    w("")
  if results.get("zoo"):
    w("### Update alone across `ecopt.zoo` architectures (random gradients)")
    w("")
    w("| model | params m | pair | new ms (wall) | base ms (wall) |"
      " ratio wall [q25, q75] |")
    w("| --- | --- | --- | --- | --- | --- |")
    for mname, m in results["zoo"].items():
      for pair, r in m["ratios"].items():
        new, base = pair.split("/")
        rw = r["wall"]
        w(f"| {mname}: {m['description']} | {m['num_params']} | {pair} |"
          f" {m['times'][new]['wall_ms']['median']:.2f} |"
          f" {m['times'][base]['wall_ms']['median']:.2f} |"
          f" {rw['median']:.3f} [{rw['q25']:.3f}, {rw['q75']:.3f}] |")
    w("")
  if results.get("sharded"):
    s = results["sharded"]
    w(f"### Sharded: 8 simulated CPU devices, mesh data=2 x model=4, MLP"
      f" {'-'.join(map(str, s['widths']))}, batch {s['batch']}")
    w("")
    w("| optimizer | unsharded ms | sharded ms | ratio | max rel diff vs"
      " unsharded | collectives in the update alone |")
    w("| --- | --- | --- | --- | --- | --- |")
    for k, v in s["results"].items():
      coll = ", ".join(
          f"{op} x{c['count']} (max {c['max_elements']} elems)"
          for op, c in v["update_collectives"].items()) or "none"
      w(f"| {k} | {v['times']['unsharded']['wall_ms']['median']:.2f} |"
        f" {v['times']['sharded']['wall_ms']['median']:.2f} |"
        f" {v['ratios']['sharded/unsharded']['wall']['median']:.2f} |"
        f" {v['max_rel_diff_after_steps']:.1e} | {coll} |")
    w("")
  return "\n".join(lines)


def write_readme(table):
  """Puts ``table`` between the README's markers (appended if absent)."""
  text = README.read_text(encoding="utf-8")
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = head + BEGIN + "\n" + table + "\n" + END + tail
  else:
    text = text.rstrip() + "\n\n" + BEGIN + "\n" + table + "\n" + END + "\n"
  README.write_text(text, encoding="utf-8")
