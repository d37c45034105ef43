"""Rewrites of quantized (QDQ) graphs that the quantizer runs for onnxruntime's CPU
kernels (formats.py); registered like every rule, not in an -O level."""
from .int8_weights import PASSES as INT8_WEIGHTS_PASSES
from .integer_act import PASSES as INTEGER_ACT_PASSES
from .nhwc_movement import PASSES as NHWC_MOVEMENT_PASSES
from .wide_scales import PASSES as WIDE_SCALES_PASSES
from .weight_codes import PASSES as WEIGHT_CODES_PASSES

PASSES: tuple = () + INT8_WEIGHTS_PASSES + INTEGER_ACT_PASSES + NHWC_MOVEMENT_PASSES + WIDE_SCALES_PASSES + WEIGHT_CODES_PASSES
