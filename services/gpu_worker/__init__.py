"""gpu_worker: one process per device slot; resident weights, paged KV, the engine (docs/architecture.md#processes, #engine)."""
