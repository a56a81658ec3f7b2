"""The ETSI GS QKD 014 REST API (FastAPI). Thin: parsing, identity and error mapping only."""
