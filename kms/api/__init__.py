"""The ETSI GS QKD 014 REST API (FastAPI). Thin: parsing, identity, routes over the application
services (``kms.service``) and error mapping only."""
