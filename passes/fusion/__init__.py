"""Fusion passes. NEUTRAL_PIPELINE runs at -O2 for every provider."""
PASSES: tuple = ()
NEUTRAL_PIPELINE: tuple[str, ...] = ()
