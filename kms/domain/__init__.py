"""The pure domain: key and block lifecycle, the key-ID scheme, pair policies, the SAE registry, and
the delivery rules of ETSI GS QKD 014. No SQLAlchemy, no storage, no web framework: the application
services (``kms.service``) apply these rules; storage imports the types, never the reverse."""
