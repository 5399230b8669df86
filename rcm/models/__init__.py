"""Networks: the Wan2.1 DiT, its VAE and text encoder, the TrigFlow wrapper, checkpoint loading."""

from rcm.models.trigflow import FunctionalNet, classifier_free_guidance, trigflow_denoise, trigflow_scalings
from rcm.models.wan import WAN_CONFIGS, WanBlock, WanConfig, WanDiT, wan_config

__all__ = [
    "WAN_CONFIGS",
    "FunctionalNet",
    "WanBlock",
    "WanConfig",
    "WanDiT",
    "classifier_free_guidance",
    "trigflow_denoise",
    "trigflow_scalings",
    "wan_config",
]
