"""loadgen: open-loop trace replay against a running Nitsum stack through the client SDK."""
