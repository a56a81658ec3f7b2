"""The KME's HTTP routes, one module per concern, each over the application services (``kms.service``):
``keys`` (Get key, Get key with key IDs), ``status`` (Get status), ``audit`` (the auditor API) and
``peer`` (KME-to-KME messages)."""
