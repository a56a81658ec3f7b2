"""The operator listener (docs/DECISIONS.md D-11): health and Prometheus metrics on a port of their
own, apart from the ETSI port that SAEs use."""
