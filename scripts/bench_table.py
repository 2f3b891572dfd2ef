"""Prints the speed tables of docs/performance.md from bench_results/ (`molf_jax.benchmarks.tables`).

  python scripts/bench_table.py [--speed | --memory-model | --trainer] [FOLDER]
"""

import sys

from molf_jax.benchmarks.tables import cli

if __name__ == "__main__":
    cli(sys.argv[1:])
