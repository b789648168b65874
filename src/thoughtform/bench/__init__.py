"""Benchmarks: parse, backend, ui (``thoughtform bench ...``)."""
