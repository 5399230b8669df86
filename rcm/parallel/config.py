"""How a run is spread over processes (``ParallelConfig``), as a plain dataclass: it imports no torch, so a
command's help builds it without torch (the mesh itself is ``rcm.parallel.mesh``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ParallelConfig:
    """How a run is spread over ``world = dp_replicate · dp_shard · cp`` processes.

    dp_replicate: HSDP replicas (1: plain FSDP).
    dp_shard: FSDP shard group size over data-parallel ranks; -1 takes what is left of the world.
    cp: Ulysses context-parallel group size (divides the head count and the patch-token count).
    activation_checkpointing: recompute each DiT block in the backward pass (grad passes only).
    param_dtype: compute dtype of FSDP's all-gathered parameters; "auto" is bf16 on CUDA and fp32 on
        CPU. Gradients are always reduced in fp32; the sharded master weights keep their own dtype.
    reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3);
        False keeps them until the backward (ZeRO-2-like, more memory, one all-gather less).
    timeout_s: collective timeout of the process group that ``init_distributed`` creates.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    activation_checkpointing: bool = False
    param_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    reshard_after_forward: bool = True
    timeout_s: float = 600.0

    def __post_init__(self):
        for name in ("dp_replicate", "cp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.dp_shard, bool) or not isinstance(self.dp_shard, int) or (
                self.dp_shard < 1 and self.dp_shard != -1):
            raise ValueError(f"ParallelConfig.dp_shard must be an int >= 1 or -1 (the rest), got {self.dp_shard!r}")
        if self.param_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"ParallelConfig.param_dtype must be 'auto', 'bfloat16' or 'float32', "
                             f"got {self.param_dtype!r}")

    def resolve(self, world_size: int) -> "ParallelConfig":
        """This config with ``dp_shard`` made concrete; raises if the sizes do not multiply to the world."""
        fixed = self.dp_replicate * self.cp
        shard = self.dp_shard
        if shard == -1:
            if world_size % fixed:
                raise ValueError(f"world size {world_size} is not divisible by dp_replicate·cp = "
                                 f"{self.dp_replicate}·{self.cp}")
            shard = world_size // fixed
        if self.dp_replicate * shard * self.cp != world_size:
            raise ValueError(f"dp_replicate·dp_shard·cp = {self.dp_replicate}·{shard}·{self.cp} = "
                             f"{self.dp_replicate * shard * self.cp} != world size {world_size}")
        return dataclasses.replace(self, dp_shard=shard)

    def compute_dtype(self, device_type: str) -> torch.dtype | None:
        """The FSDP param dtype (None: the parameters' own dtype)."""
        import torch

        if self.param_dtype == "bfloat16" or (self.param_dtype == "auto" and device_type == "cuda"):
            return torch.bfloat16
        return None
