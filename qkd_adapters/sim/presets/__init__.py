"""Named link presets (TOML); see :func:`qkd_adapters.sim.params.load_preset`."""
