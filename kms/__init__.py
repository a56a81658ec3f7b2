"""QKMS: a quantum-safe key management entity serving ETSI GS QKD 014 keys from QKD links."""

__version__ = "0.1.0"
