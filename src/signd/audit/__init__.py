"""The hash-chained audit log and its token-signed checkpoints."""
