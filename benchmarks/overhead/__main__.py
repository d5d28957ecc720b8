"""``python -m benchmarks.overhead``: see :mod:`benchmarks.overhead.run`."""

from benchmarks.overhead import run

if __name__ == "__main__":
  run.main()
