"""router: ingress, tokenisation, admission, routing, streaming and TTFT/TPOT accounting (DESIGN §2)."""
