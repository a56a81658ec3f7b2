"""Storage: SQLAlchemy 2 tables, engine set-up, migrations, and the repositories the domain uses."""
