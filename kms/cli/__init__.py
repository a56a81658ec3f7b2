"""The ``qkms`` command line (Typer)."""
