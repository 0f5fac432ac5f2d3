"""Tooling apart from the library: the latency benchmark (latency.py), its
report (report.py) and the timing harness both use (timing.py)."""
