"""Benchmarks (``make bench``): data path, end to end training, Ray Train overhead, sampling,
quality after a fixed CPU budget. Results land in ``bench/results.json`` and
``bench/results.md``; see ``docs/PERFORMANCE.md`` for how to read them.

Nothing here is a test: no thresholds, only measurements, each ratio against a baseline
measured in the same run.
"""
