"""imagebus benchmarks: `make bench` runs `python -m bench.run` and writes BENCHMARKS.md."""
