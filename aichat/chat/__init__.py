"""Chat turns: the tool loop, event streams, what the model sees, approvals and titles."""
