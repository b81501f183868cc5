"""gpu_worker: one process per device slot; resident weights, paged KV, the engine (DESIGN §2, §5)."""
