"""tp_controller: owns the topology (epochs) in the JetStream KV bucket and runs switches.

See docs/architecture.md (pool and topology, switch protocol, controller policy).
"""
