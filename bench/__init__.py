"""Benchmarks that compare the engine and the worker against the raw database limit.

`python -m bench` (or `make bench`) runs every phase against the same MariaDB/MySQL and Kafka
and prints one Markdown table; see `bench/__main__.py` for the options.
"""
