"""The device mesh: data-parallel replicate × shard × context-parallel, from a dataclass config.

    world = dp_replicate · dp_shard · cp          mesh dims ("dp_replicate", "dp_shard", "cp")

* ``dp_replicate`` × ``dp_shard`` ranks see different data (the data-parallel ranks, ``dp``);
* the ``cp`` ranks of one group see the same sample and split its token sequence (Ulysses);
* FSDP2 shards parameters over ``dp_shard`` × ``cp`` flattened (the CP ranks hold the same weights,
  so they share the shards, as torchtitan does) and replicates over ``dp_replicate`` (HSDP).

Launch with ``torchrun``; ``init_distributed`` reads its environment. Random draws must be
identical inside a CP group and differ across data-parallel ranks: ``rank_seed`` gives such a seed,
``broadcast_from_cp_leader`` enforces it for tensors that come from elsewhere.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from rcm.parallel.config import ParallelConfig

__all__ = [
    "MESH_DIMS",
    "ParallelConfig",
    "ParallelMesh",
    "broadcast_from_cp_leader",
    "build_mesh",
    "init_distributed",
    "rank_seed",
]

MESH_DIMS = ("dp_replicate", "dp_shard", "cp")


@dataclass
class ParallelMesh:
    """The world mesh and the sub-meshes each parallelism uses (kept here: flattened meshes must be
    book-kept by the caller from torch 2.11 on)."""

    config: ParallelConfig  # resolved (dp_shard concrete)
    world: DeviceMesh  # ("dp_replicate", "dp_shard", "cp")
    fsdp: DeviceMesh  # 1-D ("dp_shard_cp") or 2-D ("dp_replicate", "dp_shard_cp") for HSDP
    dp: DeviceMesh  # 1-D: the data-parallel ranks (replicate × shard)
    cp: DeviceMesh  # 1-D ("cp",), possibly of size 1

    @property
    def device_type(self) -> str:
        return self.world.device_type

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dp.size()

    @property
    def cp_rank(self) -> int:
        return self.cp.get_local_rank()

    @property
    def cp_size(self) -> int:
        return self.cp.size()

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.cp.get_group()


def build_mesh(config: ParallelConfig, device_type: str | None = None) -> ParallelMesh:
    """The mesh of ``config`` over the initialized default process group."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialized process group: call init_distributed() "
                           "(under torchrun) or torch.distributed.init_process_group first")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = config.resolve(dist.get_world_size())
    world = init_device_mesh(device_type, (cfg.dp_replicate, cfg.dp_shard, cfg.cp), mesh_dim_names=MESH_DIMS)
    # Each flattened mesh is built once and kept (re-slicing flattened dims off the root is deprecated).
    shard_cp = world["dp_shard", "cp"]._flatten("dp_shard_cp")
    dp = world["dp_replicate", "dp_shard"]._flatten("dp")
    if cfg.dp_replicate == 1:
        fsdp = shard_cp
    elif cfg.cp == 1:
        fsdp = world["dp_replicate", "dp_shard"]
    else:
        with warnings.catch_warnings():  # still the way to get a 2-D HSDP mesh with a flattened dim
            warnings.simplefilter("ignore")
            fsdp = world["dp_replicate", "dp_shard_cp"]
    return ParallelMesh(config=cfg, world=world, fsdp=fsdp, dp=dp, cp=world["cp"])


def init_distributed(config: ParallelConfig, device_type: str | None = None) -> ParallelMesh:
    """Initialize the default process group from torchrun's environment (nccl on CUDA, gloo on CPU),
    select this process's GPU from ``LOCAL_RANK``, and build the mesh. Without torchrun's variables it
    starts a one-process group, so the same code runs unlaunched."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    return build_mesh(config, device_type)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_seed(seed: int, mesh: ParallelMesh) -> int:
    """``seed + dp_rank``: a different stream per data-parallel rank, the same one on every rank of a
    CP group (so t, ε and rollout noise are identical across the group without communication)."""
    return int(seed) + mesh.dp_rank


def broadcast_from_cp_leader(mesh: ParallelMesh, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors of the CP group's first rank, on every rank of the group (in place; returned).

    For inputs that do not come from a ``rank_seed``-ed generator (data read from disk, text
    embeddings): every CP rank must see the identical sample, or the output is silently wrong."""
    if mesh.cp_size == 1:
        return tensors
    group = mesh.cp_group
    src = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t, src=src, group=group)
    return tensors
