"""Audit to SIEM: the audit stream's line format and its sinks (a JSON-lines file, a syslog receiver
over TCP or TLS). Below the services: ``kms.service.audit_shipping`` reads records from the database
and hands them here; nothing in this package touches the database (docs/DECISIONS.md D-33)."""
