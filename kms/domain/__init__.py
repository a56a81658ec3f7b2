"""The domain core: key pool, lifecycle, reservation and delivery rules. No web framework here."""
