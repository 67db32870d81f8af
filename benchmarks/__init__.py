"""Benchmarks: throughput and memory figures, measured and written down (never asserted in tests).

Run everything with ``python -m benchmarks.run``; see ``benchmarks/README.md``. Entries live in
``benchmarks/bench_*.py`` modules and register themselves with :func:`benchmarks.registry.benchmark`.
"""
