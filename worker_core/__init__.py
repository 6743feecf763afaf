"""worker_core."""
