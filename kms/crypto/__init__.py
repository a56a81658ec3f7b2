"""Cryptography for the service: envelope encryption at rest, the KEK sources (file, environment,
PKCS#11), post-quantum providers (``pqc``), the KME's identity keys and the hybrid key combiner."""
