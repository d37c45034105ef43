"""cuda provider profile."""
FUSIONS: tuple[str, ...] = ()
