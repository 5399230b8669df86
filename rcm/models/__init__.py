"""Networks: the Wan DiT (every variant, and Wan2.2 A14B's two experts), its VAE and text encoder, the TrigFlow wrapper, weight loading.

Weight loading is split in two: ``rcm.models.weights`` (generic lazy reading and strict loading)
and the Wan family's adapter (``wan_layouts``: key layouts and configs; ``wan_loading``: files).
"""

from rcm import lazy_exports

# imported on first use (torch): importing the package, or its torch-free config, stays light
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["FunctionalNet", "classifier_free_guidance", "trigflow_denoise",
                     "trigflow_scalings"], "rcm.models.trigflow"),
    **dict.fromkeys(["WAN_CONFIGS", "WAN_EXPERT_BOUNDARIES", "WanBlock", "WanConfig", "WanDiT",
                     "wan_config"], "rcm.models.wan"),
    "WanExperts": "rcm.models.wan_experts",
    **dict.fromkeys(["DIT_LAYOUTS", "detect_dit_layout", "dit_key_from_diffusers",
                     "dit_key_to_diffusers", "dit_state_dict_from_diffusers",
                     "dit_state_dict_to_diffusers", "infer_wan_config", "wan_config_from_json",
                     "wan_config_to_diffusers"], "rcm.models.wan_layouts"),
    **dict.fromkeys(["DitFiles", "dit_metadata", "dit_weight_files", "load_dit", "load_wan_experts",
                     "load_wan_model", "read_dit_config", "save_dit", "save_wan_experts"], "rcm.models.wan_loading"),
    **dict.fromkeys(["LazyStateDict", "LazyTensor", "load_state_dict_strict", "open_state_dict",
                     "read_state_dict"], "rcm.models.weights"),
})

__all__ = [
    "DIT_LAYOUTS",
    "WAN_CONFIGS",
    "WAN_EXPERT_BOUNDARIES",
    "DitFiles",
    "FunctionalNet",
    "LazyStateDict",
    "LazyTensor",
    "WanBlock",
    "WanConfig",
    "WanDiT",
    "WanExperts",
    "classifier_free_guidance",
    "detect_dit_layout",
    "dit_key_from_diffusers",
    "dit_key_to_diffusers",
    "dit_state_dict_from_diffusers",
    "dit_state_dict_to_diffusers",
    "dit_metadata",
    "dit_weight_files",
    "infer_wan_config",
    "load_dit",
    "load_state_dict_strict",
    "load_wan_experts",
    "load_wan_model",
    "open_state_dict",
    "read_dit_config",
    "read_state_dict",
    "save_dit",
    "save_wan_experts",
    "trigflow_denoise",
    "trigflow_scalings",
    "wan_config",
    "wan_config_from_json",
    "wan_config_to_diffusers",
]
