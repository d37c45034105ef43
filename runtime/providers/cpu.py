"""cpu provider profile."""
FUSIONS: tuple[str, ...] = ()
