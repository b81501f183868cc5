"""router: ingress, tokenisation, admission, routing, streaming and TTFT/TPOT accounting (docs/architecture.md#processes)."""
