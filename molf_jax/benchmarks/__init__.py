"""Benchmarks behind docs/performance.md: the timed training step (`step`), the tables from
its JSON results (`tables`), the collective traffic of the sharded step (`collectives`) and the
GPU path's numerics against transformers (`gpu_parity`), the reproduction's parts one at a time
(`sweep`) and training beside compile threads (`contention`). `scripts/bench.py`,
`bench_table.py`, `collectives.py`, `gpu_parity.py`, `bench_sweep.py` and `bench_contention.py`
are their entry points.
"""
