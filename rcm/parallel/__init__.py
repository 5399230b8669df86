"""Scale-out for rCM on PyTorch's own distributed stack (launch with ``torchrun``); see docs/parallel.md.

    mesh = init_distributed(ParallelConfig(dp_shard=-1, cp=2, activation_checkpointing=True))
    parallelize(model, mesh)                # CP (Ulysses) → activation checkpointing → FSDP2
    shard_train_state(state, mesh)          # all four models of a TrainState + its optimizers
    terms = gathered_first_term(student_losses(...), state.student)   # JVP pass on gathered params
    save_train_state(dir, state, mesh) / load_train_state(dir, state, mesh)   # DCP, any world size
    export_checkpoint(dir, "ema.safetensors")                                 # one file, for sampling

The model file knows nothing of parallelism: everything is applied from outside.
"""
from rcm.parallel.activation_checkpoint import apply_activation_checkpointing
from rcm.parallel.compile import compile_blocks
from rcm.parallel.context_parallel import (
    UlyssesAttention,
    all_to_all,
    apply_context_parallel,
    gather_sequence,
    heads_to_sequence,
    sequence_to_heads,
    split_sequence,
)
from rcm.parallel.dcp import (
    export_checkpoint,
    read_checkpoint_model,
    export_safetensors,
    full_model_state_dict,
    list_sharded_checkpoints,
    load_full_model_state_dict,
    load_latest_sharded_checkpoint,
    load_train_state,
    save_sharded_checkpoint,
    save_train_state,
)
from rcm.parallel.fsdp import (
    gathered_first_term,
    gathered_for_jvp,
    grads_finite,
    mixed_precision_policy,
    parallelize,
    materialize_train_state,
    shard_train_state,
)
from rcm.parallel.mesh import (
    MESH_DIMS,
    ParallelConfig,
    ParallelMesh,
    broadcast_from_cp_leader,
    build_mesh,
    init_distributed,
    rank_seed,
)

__all__ = [
    "MESH_DIMS",
    "ParallelConfig",
    "ParallelMesh",
    "UlyssesAttention",
    "all_to_all",
    "apply_activation_checkpointing",
    "apply_context_parallel",
    "compile_blocks",
    "broadcast_from_cp_leader",
    "build_mesh",
    "export_checkpoint",
    "read_checkpoint_model",
    "export_safetensors",
    "full_model_state_dict",
    "gather_sequence",
    "gathered_first_term",
    "gathered_for_jvp",
    "grads_finite",
    "heads_to_sequence",
    "init_distributed",
    "list_sharded_checkpoints",
    "load_full_model_state_dict",
    "load_latest_sharded_checkpoint",
    "load_train_state",
    "mixed_precision_policy",
    "parallelize",
    "rank_seed",
    "save_sharded_checkpoint",
    "save_train_state",
    "sequence_to_heads",
    "materialize_train_state",
    "shard_train_state",
    "split_sequence",
]
