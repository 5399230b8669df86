"""Wan2.1 text-to-video: distillation data, the distillation task, the sampling pipeline.

    presets.py   every default of the Wan application (per-size recipes, sampling, sizes), written once
    data.py      latent datasets (`rcm synth` writes them, `rcm distill wan...` reads them)
    synth.py     `rcm synth`: teacher samples, encoded videos or re-sharded latents
    task.py      `rcm distill wan2.1-t2v-1.3b | wan2.1-t2v-14b | wan`: the engine's task and config
    pipeline.py  sampling a latent (student or teacher), VAE decoding, video sizes, devices
    sample.py    `rcm sample wan...`: text → video
"""
