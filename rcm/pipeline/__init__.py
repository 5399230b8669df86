"""Sampling from Python: ``rcm.pipeline.load(path)`` -> a pipeline whose ``generate`` returns tensors.

    import rcm.pipeline
    pipe = rcm.pipeline.load("runs/digits-rcm/student_ema.safetensors")      # digits, student or teacher
    clips = pipe.generate([3, 1, 4], steps=2, seed=0)                         # [3, 1, 8, 16, 16] in [-1, 1]
    pipe = rcm.pipeline.load("rCM_Wan2.1_T2V_1.3B_480p.pt", model="wan2.1-t2v-1.3b", device="cuda",
                             vae_path="Wan2.1_VAE.pth", text_encoder_path="models_t5_umt5-xxl-enc-bf16.pth")
    videos = pipe.generate("A cat surfing a wave", steps=4)                   # uint8 [1, 81, 480, 832, 3]

One implementation of sampling: `rcm sample` parses its flags, calls ``load`` and ``generate`` and writes
the files. ``generate(..., steps=)`` is *this sampler's* steps: a student's consistency steps (1..4,
default 4), a teacher's UniPC/Euler steps (1..10,000, default 50). The kind (student / teacher) is read from
the file's metadata as `rcm sample` does (``kind=`` forces it). A model card beside the weights
(``<stem>.card.json``, ``rcm.checkpoint.card``) gives the defaults of ``steps``, ``sigma_max`` and the
student's mid-times; explicit arguments win. Arguments that do not apply to the kind (a student's
``sampler``, ``guidance``, ``shift``) are errors, never ignored.

* digits (``rcm.digits.sample.DigitsPipeline``): ``generate(labels, ...)`` -> clips ``[N, 1, T, H, W]``
  float32 on the CPU in [-1, 1] (``rcm.digits.data.to_unit`` maps them to [0, 1]).
* Wan (``rcm.wan.sample.WanPipeline``): ``generate(prompt, ...)`` -> videos ``[N, frames, height, width, 3]``
  uint8 on the CPU. ``load`` checks every file (headers only); each ``generate`` loads the text encoder,
  VAE and DiT in turn and frees each when done, so one network at a time is on the device. For many calls,
  ``load(..., keep_loaded=True)`` loads them once (compiles once) and keeps them on the device.
"""

from __future__ import annotations

from pathlib import Path

from rcm import ConfigError, PathArgumentError

__all__ = ["load"]


def load(path: str | Path | None = None, device: str = "cpu", *, model: str | None = None, kind: str = "auto",
         vae_path=None, text_encoder_path=None, tokenizer_path=None, image_encoder_path=None, compile: bool = False,
         keep_loaded: bool = False):
    """A pipeline for the checkpoint at ``path`` (see the module docstring).

    ``model``: "digits", a Wan name (``rcm sample``'s: "wan2.1-t2v-1.3b", ..., "wan": read from the files) or
    None: digits when ``path`` is None (the shipped teacher) or a digits file (its metadata records
    ``num_classes``), else "wan". ``device``: "cpu", "cuda" or "auto". ``kind``: "auto" (from the metadata),
    "student" or "teacher". Wan needs ``vae_path`` and ``text_encoder_path`` (``tokenizer_path``: default
    found beside the encoder; ``image_encoder_path``: Wan2.1 I2V's CLIP; ``compile``: compile each DiT block;
    ``keep_loaded``: load the networks once and keep them on the device across ``generate`` calls, instead of
    loading and freeing them in each, the lowest-memory order).
    Bad arguments are ``ConfigError`` s naming the argument."""
    if model is None:
        model = "digits" if path is None or _is_digits_file(path) else "wan"
    if model == "digits":
        given = {k: v for k, v in dict(vae_path=vae_path, text_encoder_path=text_encoder_path,
                                       tokenizer_path=tokenizer_path, image_encoder_path=image_encoder_path,
                                       compile=compile, keep_loaded=keep_loaded).items() if v}  # fmt: skip
        if given:
            raise ConfigError(next(iter(given)), "applies to Wan checkpoints; this is a digits model")
        from rcm.digits.sample import DigitsPipeline

        return DigitsPipeline(path, device=device, kind=kind)
    from rcm.wan.sample import WanPipeline

    return WanPipeline(path, model=model, device=device, kind=kind, vae_path=vae_path,
                       text_encoder_path=text_encoder_path, tokenizer_path=tokenizer_path,
                       image_encoder_path=image_encoder_path, compile=compile, keep_loaded=keep_loaded)  # fmt: skip


def _is_digits_file(path) -> bool:
    path = Path(path)
    if not path.exists():
        raise PathArgumentError("checkpoint", f"no such file or folder: {path}")
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    from rcm.models import open_state_dict

    try:
        return "num_classes" in open_state_dict(path).metadata
    except ValueError as e:
        raise ConfigError("checkpoint", str(e)) from e
