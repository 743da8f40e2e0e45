"""The process grid of a pipelined run: world = pipeline_stages x data-parallel size.

Global rank = stage * dp + dp_index (DeepSpeed's PipeDataParallelTopology order: the replicas of
one stage are neighbours, so a node holds whole data-parallel groups first). Every pipeline
stage is one DeepSpeed ZeRO-3 engine sharded over the ranks holding that stage; `PipelineGrid`
is the `mpu` handed to `deepspeed.initialize`:

- data-parallel group: the replicas of this rank's stage (ZeRO-3 shards and reduces over it);
- model-parallel group: this rank's pipeline (one rank per stage). DeepSpeed sums the squared
  gradient norm and ORs the overflow flag over it, so all stages clip by one global norm and
  skip a non-finite step together. The model-parallel *rank* reported is 0 on every stage:
  DeepSpeed counts a parameter's gradient in the norm only on model-parallel rank 0 (tensor
  parallelism replicates the unsliced parameters there), but pipeline stages share no
  parameter, so every stage must count its own. It also names checkpoint files mp_rank_00:
  each stage saves into a folder of its own (pipe{k}), a plain data-parallel ZeRO-3 checkpoint.
- point-to-point groups: one per neighbouring pair of stages and direction, so that under NCCL
  each direction has a communicator and a stream of its own (p2p.py says why).
- tensor parallelism: none (size 1).
The model-parallel size the engine records in checkpoints is set back to 1 (zero3.py).
"""
from __future__ import annotations

import datetime

import torch.distributed as dist


class PipelineGrid:
    def __init__(self, pipeline_stages: int, rank: int | None = None, world_size: int | None = None,
                 timeout_s: float | None = None):
        world = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
        if world % pipeline_stages:
            raise ValueError(f"world size {world} is not divisible by parallel.pipeline_stages={pipeline_stages}")
        self.pp, self.dp = pipeline_stages, world // pipeline_stages
        self.rank = rank
        self.stage, self.dp_rank = divmod(rank, self.dp)
        # the run's collective timeout for every group (torch's default for a new NCCL group is 10 min)
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self.is_first, self.is_last = self.stage == 0, self.stage == self.pp - 1
        # new_group is collective over the world: every rank creates every group, in one order
        self.dp_group = self.pipe_group = self.data_group = None
        for s in range(self.pp):
            g = dist.new_group(self.stage_ranks(s), timeout=timeout)
            if s == self.stage:
                self.dp_group = g
        for d in range(self.dp):
            g = dist.new_group(self.pipeline_ranks(d), timeout=timeout)
            if d == self.dp_rank:
                self.pipe_group = g
        # point-to-point: one group per neighbouring pair of stages and direction, holding the
        # replicas of both stages; in each, a rank only sends to its own pipeline's neighbour or only
        # receives from it (p2p.py says why). Keyed (source stage, destination stage).
        self.p2p_groups: dict[tuple[int, int], object] = {}
        for s in range(self.pp - 1):
            members = self.stage_ranks(s) + self.stage_ranks(s + 1)
            for src, dst in ((s, s + 1), (s + 1, s)):
                g = dist.new_group(members, timeout=timeout)
                if self.stage in (src, dst):
                    self.p2p_groups[(src, dst)] = g
        # The data loader gathers documents (Python objects) over gloo, whatever the training
        # backend. Locally synchronised: when DeepSpeed binds the world to a GPU (device_id), torch
        # makes every later group by splitting the world's NCCL communicator, a collective the
        # ranks outside a group join too, whatever its backend, but the members of a gloo group
        # never do; the other stages would wait for them. use_local_synchronization leaves the
        # ranks outside out of it (and names the group by its ranks, not by the world's count).
        g = dist.new_group(self.stage_ranks(0), timeout=timeout, backend="gloo", use_local_synchronization=True)
        if self.is_first:
            self.data_group = g
        self.tensor_group = None  # no tensor parallelism

    def stage_ranks(self, stage: int) -> list[int]:
        return [stage * self.dp + d for d in range(self.dp)]

    def pipeline_ranks(self, dp_index: int) -> list[int]:
        return [s * self.dp + dp_index for s in range(self.pp)]

    def p2p_group(self, src: int, dst: int):
        """The group of src's messages to dst (global ranks of neighbouring stages)."""
        return self.p2p_groups[(src // self.dp, dst // self.dp)]

    def rank_of(self, stage: int) -> int:
        """The global rank holding `stage` in this rank's pipeline."""
        return stage * self.dp + self.dp_rank

    # ---------------------------------------------------------------- the mpu interface DeepSpeed calls
    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_model_parallel_group(self):
        return self.pipe_group

    def get_model_parallel_rank(self) -> int:
        return 0  # see the module docstring

    def get_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self):
        return self.pipe_group

    def get_pipe_parallel_rank(self) -> int:
        return self.stage

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size

    def get_tensor_model_parallel_group(self):
        return self.tensor_group

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
