"""The Wan video VAEs (Wan2.1: 16 latent channels, 8x spatial; Wan2.2: 48 channels, 16x spatial; both
4x causal temporal): one network, its key layouts and loading.

* ``config``: ``WanVAEConfig`` (``WanVAEConfig()`` is Wan2.1, ``WanVAEConfig.wan22()`` Wan2.2) and the
  latent statistics;
* ``blocks``: the causal building blocks and the chunk cache, shared by both;
* ``model``: ``WanVAE`` (``encode`` / ``decode``, chunked);
* ``layouts``: renaming between our keys, the official release's and diffusers';
* ``loading``: ``load_vae`` / ``save_vae`` (strict, meta-device).
"""

from rcm.models.weights import load_state_dict_strict, read_state_dict
from rcm.models.vae.config import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAEConfig,
)
from rcm.models.vae.layouts import (
    detect_vae_layout,
    vae_key_table,
    vae_state_dict_from_diffusers,
    vae_state_dict_from_official,
    vae_state_dict_to_diffusers,
    vae_state_dict_to_official,
)
from rcm.models.vae.loading import default_vae_config, load_vae, read_vae_config, save_vae
from rcm.models.vae.model import WanVAE

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "WanVAE",
    "WanVAEConfig",
    "default_vae_config",
    "detect_vae_layout",
    "load_state_dict_strict",
    "load_vae",
    "read_vae_config",
    "read_state_dict",
    "save_vae",
    "vae_key_table",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_from_official",
    "vae_state_dict_to_diffusers",
    "vae_state_dict_to_official",
]
