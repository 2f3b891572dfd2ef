"""Benchmarks behind docs/performance.md: the timed training step (`step`), the tables from
its JSON results (`tables`), the collective traffic of the sharded step (`collectives`) and the
GPU path's numerics against transformers (`gpu_parity`). `scripts/bench.py`, `bench_table.py`,
`collectives.py` and `gpu_parity.py` are their entry points.
"""
