"""KMEs as child processes on 127.0.0.1, for the demo (``qkms demo``), the two-site pilot, the tests
and the benchmarks: ``launcher`` (one ``qkms serve``), ``pilot`` (a network of sites) and ``demo``."""
