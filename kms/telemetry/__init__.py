"""Process-local instruments (prometheus-client): counters and histograms that the API, the pool
filler and the database layer update, and that the operator listener exports (``kms.operator``).
The bottom layer of ``kms``: it imports nothing of the KME, so any layer may count."""
