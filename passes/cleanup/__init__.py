"""Lossless cleanup passes."""
PASSES: tuple = ()
