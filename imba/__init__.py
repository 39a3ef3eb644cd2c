"""IMBA loss for concept-balanced diffusion training, with its baselines and experiments.

Companion to Shi et al., "Imbalance in Balance: Online Concept Balancing in Generation
Models", ICCV 2025, arXiv 2507.13345.
"""

from imba.losses import (
    ImbaLossOutput,
    caption_weights,
    diffusion_loss,
    drop_conditions,
    effective_number_weights,
    imba_distance,
    imba_loss,
    imba_sample_loss,
    min_snr_weight,
)

__version__ = "0.1.0"

__all__ = [
    "ImbaLossOutput",
    "caption_weights",
    "diffusion_loss",
    "drop_conditions",
    "effective_number_weights",
    "imba_distance",
    "imba_loss",
    "imba_sample_loss",
    "min_snr_weight",
]
