"""Tamper-evident audit: hash-chained records, ML-DSA-signed checkpoints, offline verification."""
