"""INT8 quantization (calibration, provider formats, accuracy budget) and fp16 conversion.

Entry points: ``quantize(model, calib=...) -> (Model, QuantReport)`` and
``convert_fp16(model, ...) -> (Model, Fp16Report)``; CLI subcommands in ``commands``.
"""
from .fp16 import convert_fp16
from .quantize import QuantReport, quantize

__all__ = ["quantize", "QuantReport", "convert_fp16"]
