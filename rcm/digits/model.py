"""The embedded default's teacher: a small Wan DiT on moving-digit clips, class-conditioned.

Model: ``ClassConditionedDiT(WanDiT(DEMO_MODELS["digits-dit"]))``. The Wan network is unchanged; a
learned label embedding turns labels 0..9 (and the null label 10, for classifier-free guidance) into
the ``context`` tokens ``[B, text_len, text_dim]`` that Wan's cross-attention reads in place of umT5
text embeddings. Its forward is ``(x, timestep, labels) -> velocity``, so everything that calls a
network as ``net(x, 1000ρ, context)`` (losses, samplers, CFG) works with ``context = labels``
(a LongTensor ``[B]``) and ``negative_context = null_labels(labels)``.

Teacher training (`rcm train-teacher`): ``rcm.digits.teacher``.

Sampling (``sample_teacher``) uses the project's flow samplers (``rcm.samplers``): UniPC or Euler
over Wan's shifted schedule with CFG v = v_u + w (v_c − v_u).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from rcm.digits import presets
from rcm.digits.config import DEMO_SPEC
from rcm.digits.data import NUM_CLASSES, ClipSpec
from rcm.models.wan import WanConfig, WanDiT
from rcm.checkpoint.atomic import atomic_write_with

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEACHER_PATH = ASSETS / "digits_teacher.safetensors"
NULL_LABEL = NUM_CLASSES  # label 10: "no class", the CFG negative


DEMO_MODELS: dict[str, WanConfig] = {
    # The shipped teacher. Patch (1, 4, 4): 8 × 4 × 4 = 128 tokens per 8×16×16 clip. With Wan's
    # (1, 2, 2) the same clip is 512 tokens and a training step measured ~10× slower on the 2-core
    # CPU (attention is quadratic), which would not fit the CPU time budget of the demo.
    "digits-dit": WanConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, in_dim=1, out_dim=1,
                            patch_size=(1, 4, 4), text_len=4, text_dim=64, freq_dim=64),
    # For tests: the smallest Wan the attention op accepts (head dim 64), one block.
    "digits-dit-tiny": WanConfig(dim=64, ffn_dim=128, num_heads=1, num_layers=1, in_dim=1, out_dim=1,
                                 patch_size=(1, 4, 4), text_len=2, text_dim=16, freq_dim=32),
}


# --------------------------------------------------------------------------------------------
# label conditioning


class ClassConditionedDiT(nn.Module):
    """A Wan DiT conditioned on class labels: ``forward(x, timestep, labels) -> velocity``.

    ``label_embedding`` maps label ``y`` ∈ {0..num_classes} (``num_classes`` = null) to
    ``text_len`` tokens of size ``text_dim``, fed to the DiT as its ``context``.
    """

    def __init__(self, dit: WanDiT, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.dit = dit
        self.num_classes = num_classes
        cfg = dit.config
        self.label_embedding = nn.Embedding(num_classes + 1, cfg.text_len * cfg.text_dim)

    @property
    def config(self) -> WanConfig:
        return self.dit.config

    @property
    def null_label(self) -> int:
        return self.num_classes

    def context(self, labels: Tensor) -> Tensor:
        """``[B]`` labels → context tokens ``[B, text_len, text_dim]``."""
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor [B] (0..{self.num_classes}, "
                             f"{self.num_classes} = null), got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
                             f"{'' if not isinstance(labels, Tensor) else ' ' + str(labels.dtype)}")
        cfg = self.dit.config
        return self.label_embedding(labels).unflatten(1, (cfg.text_len, cfg.text_dim))

    def forward(self, x: Tensor, timestep: Tensor, labels: Tensor) -> Tensor:
        return self.dit(x, timestep, self.context(labels))


def null_labels(labels: Tensor) -> Tensor:
    """The CFG negative condition for ``labels``: the null label, same shape and device."""
    return torch.full_like(labels, NULL_LABEL)


def build_model(name: str = "digits-dit", seed: int = 0) -> ClassConditionedDiT:
    """A freshly initialised demo model (deterministic for ``seed``)."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; valid names: {', '.join(DEMO_MODELS)}")
    g = torch.Generator().manual_seed(seed)
    dit = WanDiT(DEMO_MODELS[name])
    dit.init_weights(generator=g)
    model = ClassConditionedDiT(dit)
    nn.init.normal_(model.label_embedding.weight, std=1.0, generator=g)
    return model


def architecture_metadata(model: ClassConditionedDiT) -> dict[str, str]:
    """The architecture as safetensors metadata: what ``load_model`` needs besides the weights."""
    return {"wan_config": json.dumps(asdict(model.config)), "num_classes": str(model.num_classes)}


def save_model(model: ClassConditionedDiT, path: str | Path, metadata: dict | None = None) -> None:
    """Weights as safetensors; the architecture travels in the metadata, so ``load_model`` needs
    nothing else."""
    from safetensors.torch import save_file

    meta = {**architecture_metadata(model),
            **{k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # never half a file


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> ClassConditionedDiT:
    """A model saved by ``save_model`` (strict: every key must match), in eval mode, frozen. A missing
    file is a FileNotFoundError; a truncated, corrupt or mismatched one a ValueError naming the file.
    ``device="meta"``: the architecture only (no weights read), to shard before loading."""
    from rcm.models import load_state_dict_strict, open_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: not a .safetensors file written by rcm.digits.model.save_model")
    weights = open_state_dict(path)  # the header only: a truncated or corrupt file fails here
    meta = weights.metadata
    if "wan_config" not in meta:
        raise ValueError(f"{path} has no 'wan_config' metadata: not saved by rcm.digits.model.save_model")
    try:
        wan = json.loads(meta["wan_config"])
        wan["patch_size"] = tuple(wan["patch_size"])
        with torch.device("meta" if str(device) == "meta" else "cpu"):
            model = ClassConditionedDiT(WanDiT(WanConfig(**wan)), int(meta.get("num_classes", 10)))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: unreadable architecture metadata ({type(e).__name__}: {e})") from e
    if str(device) != "meta":
        load_state_dict_strict(model, weights, what="digits model", source=str(path))  # all mismatches, one ValueError
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_teacher(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> ClassConditionedDiT:
    """The shipped digits teacher (``rcm/assets/digits_teacher.safetensors``) or ``path``."""
    return load_model(TEACHER_PATH if path is None else path, dtype, device)


def model_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------------------------
# sampling


def _device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s weights live: its samples' noise (drawn on the CPU, so a seed gives the same clips on
    every device) moves there."""
    weight = next(model.parameters(), None)
    return weight.device if weight is not None else torch.device("cpu")


@dataclass
class TeacherSampling:
    """How the teacher samples: ``steps`` of ``sampler`` over Wan's shifted schedule, CFG ``guidance``."""

    steps: int = presets.TEACHER_STEPS
    guidance: float = presets.TEACHER_GUIDANCE
    shift: float = presets.TEACHER_SHIFT
    sigma_max: float = presets.TEACHER_SIGMA_MAX
    sampler: Literal["unipc", "euler"] = "unipc"


@torch.no_grad()
def sample_teacher(model: nn.Module, labels: Tensor, generator: torch.Generator,
                   cfg: TeacherSampling = TeacherSampling(), spec: ClipSpec = DEMO_SPEC, progress=None) -> Tensor:
    """Clips ``[N, 1, T, H, W]`` float32 in [-1, 1] (clamped) of the requested ``labels``."""
    from rcm.samplers import sample_euler, sample_unipc, shifted_flow_times, teacher_velocity

    device = _device_of(model)
    noise = torch.randn((len(labels), *spec.shape), generator=generator).to(device)
    labels = labels.to(device)
    velocity = teacher_velocity(model, labels, guidance=cfg.guidance, negative_context=null_labels(labels))
    times = shifted_flow_times(cfg.steps, shift=cfg.shift, sigma_max=cfg.sigma_max)
    run = {"unipc": sample_unipc, "euler": sample_euler}[cfg.sampler]
    return run(velocity, noise, times, progress=progress).float().clamp(-1, 1)


def teacher_generator(model: nn.Module, cfg: TeacherSampling = TeacherSampling(), spec: ClipSpec = DEMO_SPEC):
    """The teacher as an ``rcm.digits.evaluate`` generator ``(labels, generator) -> clips``."""
    return lambda labels, g: sample_teacher(model, labels, g, cfg, spec)


@torch.no_grad()
def sample_student(model: nn.Module, labels: Tensor, generator: torch.Generator, steps: int = 2,
                   sigma_max: float = presets.STUDENT_SIGMA_MAX, mid_times=None, spec: ClipSpec = DEMO_SPEC, progress=None) -> Tensor:
    """Few-step consistency samples ``[N, 1, T, H, W]`` float32 in [-1, 1] (clamped) of a distilled
    student (no CFG: the student has it baked in), docs/method.md §5.2. ``mid_times`` None: the digits
    presets' for this step count (``presets.student_mid_times``)."""
    from rcm.samplers import consistency_times, sample_consistency, student_denoiser

    device = _device_of(model)
    noise = torch.randn((len(labels), *spec.shape), generator=generator).to(device)
    labels = labels.to(device)
    mid_times = presets.student_mid_times(steps) if mid_times is None else mid_times
    times = consistency_times(steps, sigma_max=sigma_max, mid_times=mid_times)
    out = sample_consistency(student_denoiser(model, labels), noise, times, generator=generator, progress=progress)
    return out.float().clamp(-1, 1)


def student_generator(model: nn.Module, steps: int = 2, sigma_max: float = presets.STUDENT_SIGMA_MAX, mid_times=None,
                      spec: ClipSpec = DEMO_SPEC):
    """A student as an ``rcm.digits.evaluate`` generator ``(labels, generator) -> clips``."""
    return lambda labels, g: sample_student(model, labels, g, steps, sigma_max, mid_times, spec)
