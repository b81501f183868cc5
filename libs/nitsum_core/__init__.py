"""Nitsum core library: wire protocol, configuration, model, KV cache, scheduling and workloads."""

__version__ = "0.1.0"
