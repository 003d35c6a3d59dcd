"""Networks: MedSegDiff-V2 and its parts."""

from .anchor import LearnableGaussianSmoothing, SpatialAttentionGate, UncertainSpatialAttention
from .medsegdiff import ANCHOR_MODES, SEMANTIC_MODES, ConditionFeatures, MedSegDiffV2
from .ssformer import NeuralBandPassFilter, SpectralCrossAttention, SSFormer, SSFormerBlock
from .unet import ResidualUNet

__all__ = [
    "ANCHOR_MODES",
    "SEMANTIC_MODES",
    "ConditionFeatures",
    "LearnableGaussianSmoothing",
    "MedSegDiffV2",
    "NeuralBandPassFilter",
    "ResidualUNet",
    "SSFormer",
    "SSFormerBlock",
    "SpatialAttentionGate",
    "SpectralCrossAttention",
    "UncertainSpatialAttention",
]
