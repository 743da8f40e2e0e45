"""How the work is spread over processes: launcher env + process group, ZeRO engines, one step's forward/backward."""
from .distributed import (DistInfo, all_gather_object, all_reduce_max, all_reduce_sum, barrier, broadcast_object,
                          init_process_group, map_launcher_env, setup_env)
from .engine import TRAINER_KEYS, build_engine, build_optimizer, resolve_ds_config, zero_stage
from .step import PlainStep, StepExecutor, StepResult, ZeroStep

__all__ = ["DistInfo", "all_gather_object", "all_reduce_max", "all_reduce_sum", "barrier", "broadcast_object",
           "init_process_group", "map_launcher_env", "setup_env", "TRAINER_KEYS", "build_engine", "build_optimizer",
           "resolve_ds_config", "zero_stage", "PlainStep", "StepExecutor", "StepResult", "ZeroStep"]
