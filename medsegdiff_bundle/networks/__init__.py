"""Networks: MedSegDiff-V2 and its parts."""

from .anchor import LearnableGaussianSmoothing, SpatialAttentionGate, UncertainSpatialAttention
from .medsegdiff import ANCHOR_MODES, CONDITION_BACKBONES, SEMANTIC_MODES, ConditionFeatures, MedSegDiffV2
from .plain_unet import PlainUNet
from .ssformer import NeuralBandPassFilter, SpectralCrossAttention, SSFormer, SSFormerBlock
from .unet import ResidualUNet

__all__ = [
    "ANCHOR_MODES",
    "CONDITION_BACKBONES",
    "SEMANTIC_MODES",
    "ConditionFeatures",
    "LearnableGaussianSmoothing",
    "MedSegDiffV2",
    "NeuralBandPassFilter",
    "PlainUNet",
    "ResidualUNet",
    "SSFormer",
    "SSFormerBlock",
    "SpatialAttentionGate",
    "SpectralCrossAttention",
    "UncertainSpatialAttention",
]
