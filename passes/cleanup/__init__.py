"""Lossless cleanup passes (run in ``registry.CLEANUP_PIPELINE`` order)."""
from .chains import CollapseChains
from .constants import ConstantToInitializer
from .cse import EliminateCommonSubexpressions
from .dead_code import EliminateDeadCode
from .dedup import MergeDuplicateInitializers
from .fold import FoldConstants
from .identity import EliminateIdentity
from .layout import SinkTransposes
from .noop import EliminateNoop
from .shapes import SimplifyShapes

PASSES: tuple = (
    ConstantToInitializer,
    EliminateIdentity,
    EliminateNoop,
    FoldConstants,
    SimplifyShapes,
    SinkTransposes,
    CollapseChains,
    EliminateCommonSubexpressions,
    MergeDuplicateInitializers,
    EliminateDeadCode,
)
