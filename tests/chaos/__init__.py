"""Crash and chaos tests: real KME processes (and PostgreSQL) killed under load on 127.0.0.1, then the
promises checked — nothing served twice, every key a master received fetchable by its slave or
accounted for, ``qkms db check`` and ``qkms audit verify`` clean. Select with ``-m chaos``; replay a
run's kill schedule with ``QKMS_CHAOS_SEED``."""
