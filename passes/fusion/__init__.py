"""Fusion passes. NEUTRAL_PIPELINE runs at -O2 for every provider."""
from .activation import PASSES as ACTIVATION_PASSES
from .affine_into_conv import PASSES as AFFINE_CONV_PASSES
from .attention import PASSES as ATTENTION_PASSES
from .attention_gqa_cache import PASSES as GQA_PASSES
from .conv_affine import PASSES as CONV_AFFINE_PASSES
from .conv_bn import PASSES as CONV_BN_PASSES
from .convtranspose_shuffle import PASSES as CONVTRANSPOSE_SHUFFLE_PASSES
from .embed_layernorm import PASSES as EMBED_LAYERNORM_PASSES
from .gemm_bias import PASSES as GEMM_BIAS_PASSES
from .global_pool import PASSES as GLOBAL_POOL_PASSES
from .hardswish import PASSES as HARDSWISH_PASSES
from .layernorm import PASSES as LAYERNORM_PASSES
from .matmul_add import PASSES as MATMUL_ADD_PASSES
from .matmul_scale import PASSES as MATMUL_SCALE_PASSES
from .pack_qkv import PASSES as PACK_QKV_PASSES
from .pad import PASSES as PAD_PASSES
from .skip_layernorm import PASSES as SKIP_LAYERNORM_PASSES

PASSES: tuple = (
    () + ATTENTION_PASSES + GQA_PASSES + ACTIVATION_PASSES + HARDSWISH_PASSES + LAYERNORM_PASSES + SKIP_LAYERNORM_PASSES
    + CONV_BN_PASSES + CONV_AFFINE_PASSES + AFFINE_CONV_PASSES + PAD_PASSES + MATMUL_ADD_PASSES + MATMUL_SCALE_PASSES + EMBED_LAYERNORM_PASSES
    + GLOBAL_POOL_PASSES + GEMM_BIAS_PASSES + CONVTRANSPOSE_SHUFFLE_PASSES + PACK_QKV_PASSES
)
# Exact rewrites into standard ONNX ops only. SiLU is not here: ONNX has no Swish
# before opset 24, so it is fused only into onnxruntime's QuickGelu (CPU/CUDA profiles).
NEUTRAL_PIPELINE: tuple[str, ...] = (
    "fuse-conv-bn",
    "fuse-conv-affine",
    "fuse-affine-into-conv",
    "fuse-pad",
    "fuse-hardswish",
    "fold-matmul-scale",
    "fuse-matmul-add",
    "fuse-layernorm",
)
