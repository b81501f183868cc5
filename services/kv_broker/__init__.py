"""kv_broker: the directory of which worker holds which request's KV blocks (docs/architecture.md)."""
