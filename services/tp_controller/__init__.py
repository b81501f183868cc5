"""tp_controller: owns the topology (epochs) in the JetStream KV bucket (DESIGN §2, §3, §6)."""
