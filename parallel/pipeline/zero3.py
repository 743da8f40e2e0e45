"""What ZeRO-3 assumes that a pipeline stage breaks, and the two adjustments for it.

1. ZeRO-3 records the order in which submodules fetch their parameters during a step (its
   "trace", deepspeed/runtime/zero/partitioned_param_coordinator.py) to prefetch them next time,
   and at the start of every engine forward checks that the recorded order is the same on every
   rank, with a broadcast from global rank 0 over the whole world. A pipeline rank holds a
   different module from its neighbours and runs a different list of work, so that check is a
   collective the other stages never join (the run hangs on the first forward). The check is
   scoped here to the replicas of this rank's stage, which do run the same list (schedule.py).
2. The trace is also invalidated whenever the order changes, and on a pipeline rank it changes
   with every piece (down, up, forward, backward interleave by micro-batch), so a prefetch
   predicted from it would fetch parameters the next piece does not use. Prefetching is off for
   stage engines (`stage3_prefetch_bucket_size` 0); parameters are fetched when a submodule
   runs, or kept whole with `parallel.keep_params_gathered`.
3. Persistent parameters (numel <= `stage3_param_persistence_threshold`) are meant to stay whole
   between uses, but only a complete trace filters them out of a submodule's release: while the
   trace is incomplete, `release_sub_module` releases every parameter of the submodule,
   persistent or not, and the next micro-batch gathers them again (measured with DeepSpeed's
   communication log: the all-gather bytes of a stage grew with the micro-batches of a step
   although every parameter was persistent). `keep_persistent_params` makes the release after a
   submodule skip persistent parameters, as the complete-trace path does; the optimizer step
   still releases and re-gathers them once per step (its own `_partition_all_parameters` and
   `_post_step`). With `parallel.keep_params_gathered` every parameter is persistent, so a stage
   is gathered once per step whatever the number of micro-batches.
"""
from __future__ import annotations

import torch.distributed as dist


def scope_trace_check_to(group) -> None:
    """Make ZeRO-3's cross-rank trace check compare this rank with its stage replicas only.

    Module-global in DeepSpeed, so one process holds one stage engine (always the case here)."""
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator

    src = dist.get_global_rank(group, 0) if group is not None else 0

    def same_across_stage_replicas(ints: list[int]) -> None:
        theirs = [list(ints)]
        dist.broadcast_object_list(theirs, src=src, group=group)
        if theirs[0] != list(ints):
            raise RuntimeError(f"ZeRO-3 trace differs between the replicas of a pipeline stage: rank {src} recorded "
                               f"{theirs[0]}, rank {dist.get_rank()} {list(ints)} (they must run the same schedule)")

    coordinator.assert_ints_same_as_other_ranks = same_across_stage_replicas


def stage_engine_config(ds: dict) -> dict:
    """No trace-predicted prefetch on a stage engine (item 2 of the module docstring)."""
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = 0
    return ds


def one_checkpoint_part_per_stage(engine) -> None:
    """A stage's checkpoint is one data-parallel ZeRO-3 checkpoint (one mp_rank_00 file in its
    pipe{k} folder). The engine took the pipeline's size as its model-parallel size (the mpu
    reports it, so that the optimizer reduces the gradient norm over the pipeline), and would
    record it in the checkpoint and then expect that many model-parallel files when loading it."""
    engine.mp_world_size = 1


def keep_persistent_params(engine) -> None:
    """Item 3 of the module docstring, on this engine's parameter coordinator (instance
    attributes: the DeepSpeed classes are untouched)."""
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    release_param = coordinator._PartitionedParameterCoordinator__release_param
    release_sub_module = coordinator.release_sub_module
    inside = [False]

    def release_after_submodule(submodule, forward=False):
        inside[0] = True
        try:
            return release_sub_module(submodule, forward)
        finally:
            inside[0] = False

    def release_unless_persistent(param, free_data: bool = True):
        if inside[0] and getattr(param, "ds_persist", False):
            return
        return release_param(param, free_data)

    coordinator.release_sub_module = release_after_submodule
    coordinator._PartitionedParameterCoordinator__release_param = release_unless_persistent
