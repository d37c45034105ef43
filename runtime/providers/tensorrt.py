"""tensorrt provider profile."""
FUSIONS: tuple[str, ...] = ()
