"""Benchmarks: the workload generator and the SQLite baseline they compare against."""
