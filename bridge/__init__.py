"""The Bridge: JetStream in, dispatches out, completions back, ack or nak; envelopes and ids."""
