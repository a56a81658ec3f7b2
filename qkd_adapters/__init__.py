"""Where key material comes from: QKD link adapters that yield key blocks.

This package knows nothing of HTTP, SQL or SAEs. Every adapter speaks the one interface in
:mod:`qkd_adapters.keyblock`; the KMS depends on that interface, never the other way round.
"""
