"""The H-Net model in plain PyTorch: no DeepSpeed, no ranks, no I/O beyond checkpoint reading."""
from .checkpoint_io import CheckpointMismatchError, check_state_dict, load_public_checkpoint, read_state_dict
from .config import AttnConfig, ConfigError, HNetConfig, SSMConfig
from .dynamic_chunking import RoutingModule, RoutingOutput, chunk, dechunk, ratio_loss, ste
from .flops import (DocCostModel, attention_pairs, document_cost_terms, document_flops, flops_per_byte, num_parameters,
                    stage_compression)
from .hnet import HNet, HNetForCausalLM, HNetOutput, StageStats
from .mamba2 import Mamba2
from .optim_groups import lr_multipliers, no_weight_decay, param_groups_spec, parameter_stages


def zero3_leaf_modules() -> list[type]:
    """Module classes whose forward reads child modules' weights directly (Mamba-2 reads
    conv1d.weight; its fused path reads every child weight). Under ZeRO-3 they must be
    registered with deepspeed.utils.set_z3_leaf_modules so their parameters are gathered."""
    return [Mamba2]


__all__ = [
    "AttnConfig", "CheckpointMismatchError", "ConfigError", "DocCostModel", "HNet", "HNetConfig", "HNetForCausalLM", "HNetOutput",
    "Mamba2", "RoutingModule", "RoutingOutput", "SSMConfig", "StageStats", "attention_pairs", "check_state_dict",
    "chunk", "dechunk", "document_cost_terms", "document_flops", "flops_per_byte", "load_public_checkpoint",
    "lr_multipliers", "no_weight_decay", "num_parameters", "param_groups_spec", "parameter_stages", "ratio_loss",
    "read_state_dict", "stage_compression", "ste", "zero3_leaf_modules",
]
