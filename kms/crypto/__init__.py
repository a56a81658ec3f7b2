"""Cryptography for the service: envelope encryption at rest (and, later, PQC providers)."""
