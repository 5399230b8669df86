"""Key layouts of the Wan VAE weights: ours, the official release (``Wan2.1_VAE.pth``,
``Wan2.2_VAE.pth``) and diffusers' ``AutoencoderKLWan``. Shapes are the same in all three; only names
differ, and the Wan2.2 (residual) stages nest their blocks where Wan2.1 numbers them flat."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor

from .config import WanVAEConfig

__all__ = [
    "LAYOUTS",
    "detect_vae_layout",
    "vae_key_table",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_from_official",
    "vae_state_dict_to_diffusers",
    "vae_state_dict_to_official",
]

#   ours                                   official (Wan2.1_VAE.pth)              diffusers (AutoencoderKLWan)
#   encoder.conv_in                        encoder.conv1                          encoder.conv_in
#   encoder.stages.{i}.blocks.{j}          encoder.downsamples.{i(n+1)+j}         encoder.down_blocks.{i(n+1)+j}
#   encoder.stages.{i}.downsample          encoder.downsamples.{i(n+1)+n}         encoder.down_blocks.{i(n+1)+n}
#   {en,de}coder.mid.block1/attn/block2    {en,de}coder.middle.0/1/2              {en,de}coder.mid_block.resnets.0/
#                                                                                   attentions.0/resnets.1
#   {en,de}coder.norm_out.weight           {en,de}coder.head.0.gamma              {en,de}coder.norm_out.gamma
#   {en,de}coder.conv_out                  {en,de}coder.head.2                    {en,de}coder.conv_out
#   quant_conv / post_quant_conv           conv1 / conv2                          quant_conv / post_quant_conv
#   decoder.conv_in                        decoder.conv1                          decoder.conv_in
#   decoder.stages.{i}.blocks.{j}          decoder.upsamples.{i(n+2)+j}           decoder.up_blocks.{i}.resnets.{j}
#   decoder.stages.{i}.upsample            decoder.upsamples.{i(n+2)+n+1}         decoder.up_blocks.{i}.upsamplers.0
# Wan2.2 (residual stages; their shortcuts have no parameters):
#   encoder.stages.{i}.blocks.{j}       encoder.downsamples.{i}.downsamples.{j}   encoder.down_blocks.{i}.resnets.{j}
#   encoder.stages.{i}.downsample       encoder.downsamples.{i}.downsamples.{n}   encoder.down_blocks.{i}.downsampler
#   decoder.stages.{i}.blocks.{j}       decoder.upsamples.{i}.upsamples.{j}       decoder.up_blocks.{i}.resnets.{j}
#   decoder.stages.{i}.upsample         decoder.upsamples.{i}.upsamples.{n+1}     decoder.up_blocks.{i}.upsampler
# with n = num_res_blocks, and inside the modules:
#   res block  norm1.weight conv1 norm2.weight conv2 shortcut  |  residual.0.gamma residual.2 residual.3.gamma
#              residual.6 shortcut  |  norm1.gamma conv1 norm2.gamma conv2 conv_shortcut
#   attention  norm.weight to_qkv proj                          |  norm.gamma to_qkv proj (both)
#   resampler  conv time_conv                                   |  resample.1 time_conv (both)

_RES = {
    "official": {"norm1.weight": "residual.0.gamma", "conv1": "residual.2", "norm2.weight": "residual.3.gamma",
                 "conv2": "residual.6", "shortcut": "shortcut"},
    "diffusers": {"norm1.weight": "norm1.gamma", "conv1": "conv1", "norm2.weight": "norm2.gamma",
                  "conv2": "conv2", "shortcut": "conv_shortcut"},
}  # fmt: skip
_ATTN = {"norm.weight": "norm.gamma", "to_qkv": "to_qkv", "proj": "proj"}
_RESAMPLE = {"conv": "resample.1", "time_conv": "time_conv"}
LAYOUTS = ("ours", "official", "diffusers")


def _leaf_map(table: dict[str, str], has_bias: Callable[[str], bool] = lambda k: not k.endswith(".weight")):
    """Expands ``{'conv1': 'residual.2', 'norm1.weight': ...}`` to full parameter names."""
    out = {}
    for ours, theirs in table.items():
        if has_bias(ours):
            out[ours + ".weight"] = theirs + ".weight"
            out[ours + ".bias"] = theirs + ".bias"
        else:
            out[ours] = theirs
    return out


def vae_key_table(layout: str, num_stages: int, num_res_blocks: int, residual: bool = False) -> dict[str, str]:
    """``{our key: key in layout}`` for every parameter a VAE with this structure can have (a superset:
    optional shortcuts and resamplers are included). ``residual``: the Wan2.2 structure."""
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    n = num_res_blocks
    res, attn, resample = _leaf_map(_RES[layout]), _leaf_map(_ATTN), _leaf_map(_RESAMPLE)
    modules: list[tuple[str, str, dict]] = []  # (our prefix, their prefix, leaf map)

    def conv(ours, theirs):
        modules.append((ours, theirs, {"weight": "weight", "bias": "bias"}))

    off = layout == "official"
    conv("quant_conv", "conv1" if off else "quant_conv")
    conv("post_quant_conv", "conv2" if off else "post_quant_conv")
    for part in ("encoder", "decoder"):
        conv(f"{part}.conv_in", f"{part}.conv1" if off else f"{part}.conv_in")
        conv(f"{part}.conv_out", f"{part}.head.2" if off else f"{part}.conv_out")
        norm_out = f"{part}.head.0.gamma" if off else f"{part}.norm_out.gamma"
        modules.append((f"{part}.norm_out", "", {"weight": norm_out}))
        mid = [f"{part}.middle.{k}" for k in range(3)] if off else [
            f"{part}.mid_block.resnets.0", f"{part}.mid_block.attentions.0", f"{part}.mid_block.resnets.1"]
        modules += [(f"{part}.mid.block1", mid[0], res), (f"{part}.mid.attn", mid[1], attn),
                    (f"{part}.mid.block2", mid[2], res)]  # fmt: skip
    for i in range(num_stages):
        if residual:
            enc = f"encoder.downsamples.{i}.downsamples." if off else f"encoder.down_blocks.{i}.resnets."
            enc_blocks = [enc + str(j) for j in range(n)]
            enc_down = enc + str(n) if off else f"encoder.down_blocks.{i}.downsampler"
            dec = f"decoder.upsamples.{i}.upsamples." if off else f"decoder.up_blocks.{i}.resnets."
            dec_blocks = [dec + str(j) for j in range(n + 1)]
            dec_up = dec + str(n + 1) if off else f"decoder.up_blocks.{i}.upsampler"
        else:
            enc = "encoder.downsamples." if off else "encoder.down_blocks."
            enc_blocks = [f"{enc}{i * (n + 1) + j}" for j in range(n)]
            enc_down = f"{enc}{i * (n + 1) + n}"
            if off:
                dec_blocks = [f"decoder.upsamples.{i * (n + 2) + j}" for j in range(n + 1)]
                dec_up = f"decoder.upsamples.{i * (n + 2) + n + 1}"
            else:
                dec_blocks = [f"decoder.up_blocks.{i}.resnets.{j}" for j in range(n + 1)]
                dec_up = f"decoder.up_blocks.{i}.upsamplers.0"
        modules += [(f"encoder.stages.{i}.blocks.{j}", theirs, res) for j, theirs in enumerate(enc_blocks)]
        modules.append((f"encoder.stages.{i}.downsample", enc_down, resample))
        modules += [(f"decoder.stages.{i}.blocks.{j}", theirs, res) for j, theirs in enumerate(dec_blocks)]
        modules.append((f"decoder.stages.{i}.upsample", dec_up, resample))
    table = {}
    for ours_prefix, their_prefix, leaves in modules:
        for leaf, their_leaf in leaves.items():
            table[f"{ours_prefix}.{leaf}"] = f"{their_prefix}.{their_leaf}" if their_prefix else their_leaf
    return table


def _max_group(keys, pattern: str) -> int | None:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) if found else None


def _infer_structure(sd: Mapping[str, Tensor], layout: str) -> tuple[int, int, bool] | None:
    """``(num_stages upper bound, num_res_blocks, residual)`` from the key names (and, in our layout,
    one shape), or None if they don't tell."""
    keys = list(sd.keys())
    ints = [int(p) for k in keys for p in k.split(".") if p.isdigit()]
    num_stages = max(ints, default=0) + 1
    n, residual = None, False
    if layout == "ours":
        n = _max_group(keys, r"encoder\.stages\.\d+\.blocks\.(\d+)\.")
        n = None if n is None else n + 1
        # the one structural difference our names don't show: 2.1's upsamplers halve the channels
        up = sd.get("decoder.stages.0.upsample.conv.weight")
        residual = up is not None and up.shape[0] == up.shape[1]
    elif layout == "diffusers":
        residual = any(re.match(r"(encoder\.down_blocks\.\d+\.resnets|decoder\.up_blocks\.\d+\.upsampler)\.", k)
                       for k in keys)  # fmt: skip
        n = _max_group(keys, r"decoder\.up_blocks\.\d+\.resnets\.(\d+)\.")
    elif layout == "official":
        residual = any(re.match(r"(encoder\.downsamples\.\d+\.downsamples|decoder\.upsamples\.\d+\.upsamples)\.", k)
                       for k in keys)  # fmt: skip
        if residual:  # the decoder stages' blocks are numbered 0..n
            n = _max_group(keys, r"decoder\.upsamples\.\d+\.upsamples\.(\d+)\.residual\.")
            if n is None:
                n = _max_group(keys, r"encoder\.downsamples\.\d+\.downsamples\.(\d+)\.residual\.")
                n = None if n is None else n + 1
        else:
            ks = [int(m.group(1)) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample\.", k))]
            n = min(ks) if ks else None
            if n is None:
                ks = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))]
                n = min(ks) - 1 if ks else None
    return None if n is None or n < 1 else (num_stages, n, residual)


def _structure(sd: Mapping, layout: str, config: WanVAEConfig | None) -> tuple[int, int, bool]:
    if config is not None:
        return len(config.dim_mult), config.num_res_blocks, config.residual
    found = _infer_structure(sd, layout)
    if found is None:
        d = WanVAEConfig()
        return len(d.dim_mult), d.num_res_blocks, d.residual
    return found


def _rename(sd: Mapping[str, Tensor], table: Mapping[str, str]) -> dict[str, Tensor]:
    """Renames keys by ``table``; keys it doesn't know are kept as they are (a strict load reports them)."""
    out = {}
    for k, v in sd.items():
        new = table.get(k, k)
        if new in out:
            raise ValueError(f"two VAE keys map to {new!r} (one of them is {k!r})")
        out[new] = v
    return out


def vae_state_dict_to_official(sd: Mapping[str, Tensor], config: WanVAEConfig | None = None) -> dict[str, Tensor]:
    """Our keys -> the official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` keys (``config`` gives the
    structure; inferred from the state dict if None)."""
    return _rename(sd, vae_key_table("official", *_structure(sd, "ours", config)))


def vae_state_dict_from_official(sd: Mapping[str, Tensor], config: WanVAEConfig | None = None) -> dict[str, Tensor]:
    """Official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` keys -> ours."""
    table = vae_key_table("official", *_structure(sd, "official", config))
    return _rename(sd, {v: k for k, v in table.items()})


def vae_state_dict_to_diffusers(sd: Mapping[str, Tensor], config: WanVAEConfig | None = None) -> dict[str, Tensor]:
    """Our keys -> ``diffusers.AutoencoderKLWan`` keys."""
    return _rename(sd, vae_key_table("diffusers", *_structure(sd, "ours", config)))


def vae_state_dict_from_diffusers(sd: Mapping[str, Tensor], config: WanVAEConfig | None = None) -> dict[str, Tensor]:
    """``diffusers.AutoencoderKLWan`` keys -> ours."""
    table = vae_key_table("diffusers", *_structure(sd, "diffusers", config))
    return _rename(sd, {v: k for k, v in table.items()})


_FROM = {"official": vae_state_dict_from_official, "diffusers": vae_state_dict_from_diffusers}
_TO = {"official": vae_state_dict_to_official, "diffusers": vae_state_dict_to_diffusers}


def detect_vae_layout(keys) -> str:
    """'ours', 'official' or 'diffusers', from the key names; ValueError if none fits."""
    keys = set(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("encoder.stages.") or has("decoder.stages.") or has("encoder.mid."):
        return "ours"
    if any(has(p) for p in ("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.", "encoder.conv1.")):
        return "official"
    if has("encoder.down_blocks.") or has("decoder.up_blocks.") or has("encoder.mid_block."):
        return "diffusers"
    sample = ", ".join(sorted(keys)[:5]) or "no keys"
    raise ValueError(f"not a Wan VAE state dict (unrecognized keys: {sample})")


