"""Scale-out for rCM on PyTorch's own distributed stack (launch with ``torchrun``); see docs/parallel.md.

    mesh = init_distributed(ParallelConfig(dp_shard=-1, cp=2, activation_checkpointing=True))
    parallelize(model, mesh)                # CP (Ulysses) → activation checkpointing → FSDP2
    shard_train_state(state, mesh)          # all four models of a TrainState + its optimizers
    terms = gathered_first_term(student_losses(...), state.student)   # JVP pass on gathered params
    full_model_state_dict(model) / load_full_model_state_dict(model, weights)  # whole weights, rank 0

Sharded checkpoints (DCP, any world size) are the checkpointer's DCP backend: ``rcm.checkpoint.dcp``.

The model file knows nothing of parallelism: everything is applied from outside.
"""
from rcm import lazy_exports
from rcm.parallel.config import ParallelConfig

# imported on first use (torch): importing the package, or its torch-free config, stays light
__getattr__, __dir__ = lazy_exports(__name__, {
    "apply_activation_checkpointing": "rcm.parallel.activation_checkpoint",
    "compile_blocks": "rcm.parallel.compile",
    **dict.fromkeys(["UlyssesAttention", "all_to_all", "apply_context_parallel", "gather_sequence",
                     "heads_to_sequence", "sequence_to_heads", "split_sequence"], "rcm.parallel.context_parallel"),
    **dict.fromkeys(["full_model_state_dict", "gathered_first_term", "gathered_for_jvp",
                     "grads_finite", "load_full_model_state_dict", "materialize_train_state",
                     "mixed_precision_policy", "parallelize", "shard_train_state"], "rcm.parallel.fsdp"),
    **dict.fromkeys(["MESH_DIMS", "ParallelMesh", "broadcast_from_cp_leader", "build_mesh",
                     "init_distributed", "rank_seed"], "rcm.parallel.mesh"),
})

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
    "full_model_state_dict",
    "gather_sequence",
    "gathered_first_term",
    "gathered_for_jvp",
    "grads_finite",
    "heads_to_sequence",
    "init_distributed",
    "load_full_model_state_dict",
    "mixed_precision_policy",
    "parallelize",
    "rank_seed",
    "sequence_to_heads",
    "materialize_train_state",
    "shard_train_state",
    "split_sequence",
]
