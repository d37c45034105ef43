"""Rewrites of quantized (QDQ) graphs that the quantizer runs for onnxruntime's CPU
kernels (formats.py); registered like every rule, not in an -O level."""
from .wide_scales import PASSES as WIDE_SCALES_PASSES

PASSES: tuple = () + WIDE_SCALES_PASSES
