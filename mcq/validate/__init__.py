"""Validation of quantized variants against the reference model: accuracy metrics (runners, memory and latency
probes and reports build on them)."""
