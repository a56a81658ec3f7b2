"""``python -m kms`` is the ``qkms`` command."""

from kms.cli.main import app

app()
