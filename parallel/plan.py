"""Capacity planner: per-rank memory, communication and step time of a configuration on a cluster.

    python -m parallel.plan pretrain/configs/hnet_2stage_L.yaml --nodes 8 --gpus-per-node 8 --gpu H100
    python -m parallel.plan tests/fixtures/hnet_2stage_XL.json --nodes 64 --gpus-per-node 8 --json plan.json

For every candidate layout (ZeRO stage 1, 2, 3, stage 3 with CPU offload; pipeline stages across
chunk levels, from 1 to the number of hierarchy levels; the data-parallel size that is left) it
predicts, from the model code rather than a table:

- memory per rank: parameters, gradients and optimizer state in the dtypes this trainer uses (fp32
  parameters and master weights, bf16 compute under autocast, AdamW's two fp32 moments), sharded
  as each ZeRO stage shards them (`state_bytes`, checked against real engines by
  tests/parallel/test_plan.py); activations of one micro-batch from the layer shapes at the
  micro-batch's byte budget and the ratio targets (with and without activation checkpointing);
  and a fixed framework overhead;
- communicated bytes per rank and step (`comm_bytes`: what the ZeRO stage does per micro-batch
  and per step, in each parameter's communication dtype under bf16 (`parameter_sizes`),
  checked against DeepSpeed's communication log) and their time on the intra- and inter-node
  links;
- compute time from the FLOP estimate (`pretrain.model.flops`) at an achievable share of the
  peak (`--efficiency`), the pipeline bubble of the V schedule at that many micro-batches, and
  so the step time, bytes per second and MFU.
Layouts that do not fit in memory are marked; the fastest that fits is recommended with the
DeepSpeed file, the overrides and the sbatch line to run it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

GPUS = {  # name: (peak bf16 TFLOP/s, memory GB, intra-node GB/s per GPU, inter-node GB/s per GPU)
    "H100": (989.0, 80.0, 450.0, 50.0),
    "H200": (989.0, 141.0, 450.0, 50.0),
    "A100": (312.0, 80.0, 300.0, 25.0),
}
OVERHEAD_GB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation (a measured-on-GPU figure is still owed)
ADAM_BYTES = 8  # two fp32 moments per parameter
ZERO_LAYOUTS = ("zero1", "zero2", "zero3", "zero3_offload")


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: str
    peak_tflops: float
    memory_gb: float
    intra_gbps: float
    inter_gbps: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def cluster_of(nodes: int, gpus_per_node: int, gpu: str) -> Cluster:
    if gpu in GPUS:
        return Cluster(nodes, gpus_per_node, gpu, *GPUS[gpu])
    try:  # NAME:TFLOPS:GB
        name, tflops, gb = gpu.split(":")
        return Cluster(nodes, gpus_per_node, name, float(tflops), float(gb), 300.0, 25.0)
    except ValueError:
        raise SystemExit(f"--gpu {gpu!r}: one of {sorted(GPUS)} or NAME:TFLOPS:GB") from None


# ----------------------------------------------------------------------------- sharded state
def parameter_sizes(model_cfg, precision: str = "fp32") -> tuple[list[int], list[int]]:
    """Element count and communication bytes per element of every parameter tensor of the model
    (from the model code, on meta). Under bf16, DeepSpeed's torch_autocast gives the parameters
    of modules whose class is exactly one of its lower-precision-safe modules (nn.Linear and the
    nn.ConvNd, deepspeed/runtime/torch_autocast.py) a bf16 communication dtype: their gradients
    are reduced and their ZeRO-3 gathers made in bf16. The rest stays fp32: the norms, the
    embedding, the routing and `residual_proj` (its own class, fp32 by design)."""
    import torch

    from pretrain.model import HNetForCausalLM

    with torch.device("meta"):
        model = HNetForCausalLM(model_cfg)
    low: set[int] = set()
    if precision == "bf16":
        from deepspeed.runtime.torch_autocast import LOWER_PRECISION_SAFE_MODULES

        low = {id(p) for mod in model.modules() if type(mod) in LOWER_PRECISION_SAFE_MODULES
               for p in mod.parameters(recurse=False)}
    params = list(model.parameters())
    return [p.numel() for p in params], [2 if id(p) in low else 4 for p in params]


def parameter_numels(model_cfg) -> list[int]:
    """Element counts of every parameter tensor of the model."""
    return parameter_sizes(model_cfg)[0]


def state_bytes(numels: list[int], zero: str, dp: int, persistence_threshold: int = 100_000) -> dict[str, float]:
    """Bytes one rank holds of parameters, fp32 master partition and Adam moments (gradients,
    which live inside a step, are `grads`).

    ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py): whole fp32 parameters; the flat fp32
    master and the moments cover ceil(total / dp) elements; ZeRO-1 keeps whole gradients, ZeRO-2
    its partition. ZeRO-3 (stage3.py): every tensor's partition ceil(n / dp) and, for persistent
    tensors (n <= the threshold), the whole tensor as well; master, moments and gradients as the
    partitions. Offload moves master and moments to host memory."""
    total = sum(numels)
    if zero in ("zero1", "zero2"):
        part = math.ceil(total / dp)
        grads = total if zero == "zero1" else part
        return {"params": 4.0 * total, "grads": 4.0 * grads, "master": 4.0 * part, "optimizer": ADAM_BYTES * part}
    part = sum(math.ceil(n / dp) for n in numels)
    persistent = sum(n for n in numels if n <= persistence_threshold)
    on_gpu = zero != "zero3_offload"
    return {"params": 4.0 * (part + persistent), "grads": 4.0 * part, "master": 4.0 * part * on_gpu,
            "optimizer": ADAM_BYTES * part * on_gpu}


# ----------------------------------------------------------------------------- communication
def comm_bytes(numels: list[int], zero: str, dp: int, micro_batches: int,
               persistence_threshold: int = 100_000, elem_bytes: list[int] | None = None) -> dict[str, float]:
    """Bytes a rank hands to each kind of collective per step (as DeepSpeed's comms logger counts
    them), the shipped ZeRO files' settings; `elem_bytes`: each parameter's communication bytes
    per element (parameter_sizes; default 4, fp32 throughout).

    ZeRO-1: the gradients are all-reduced once, at the step's last micro-batch; ZeRO-2 all-reduces
    them at every micro-batch (its gradient hooks reduce whatever the accumulation boundary);
    both then all-gather the updated fp32 parameter partitions. ZeRO-3: the non-persistent
    parameters are gathered once per micro-batch (the forward's gather stays available for the
    backward within `stage3_max_reuse_distance`), the gradients reduce-scattered per micro-batch,
    both in each parameter's communication dtype, and the persistent parameters gathered in fp32
    once after the optimizer step."""
    elem = elem_bytes or [4] * len(numels)
    total = sum(numels)
    reduced = sum(n * b for n, b in zip(numels, elem))
    gathers = dp > 1  # with one rank DeepSpeed skips the gathers but still calls the reductions (moving nothing)
    if zero in ("zero1", "zero2"):
        reduces = 1 if zero == "zero1" else micro_batches
        return {"all_gather": 4.0 * math.ceil(total / dp) * gathers, "reduce_scatter": 0.0,
                "all_reduce": float(reduced * reduces)}
    big = sum(math.ceil(n / dp) * b for n, b in zip(numels, elem) if n > persistence_threshold)
    small = sum(math.ceil(n / dp) * 4 for n in numels if n <= persistence_threshold)
    return {"all_gather": float(micro_batches * big + small) * gathers,
            "reduce_scatter": float(reduced * micro_batches), "all_reduce": 0.0}


def wire_bytes(comm: dict[str, float], dp: int) -> float:
    """Bytes each rank sends on a ring for those collectives: an all-gather of a partition sends
    (dp-1) partitions, a reduce-scatter (dp-1)/dp of the tensor, an all-reduce twice that."""
    f = (dp - 1) / dp
    return comm["all_gather"] * (dp - 1) + comm["reduce_scatter"] * f + comm["all_reduce"] * 2 * f


# ----------------------------------------------------------------------------- activations
def activation_bytes(model_cfg, micro_batch_bytes: int, checkpointing: bool, ratios: list[float] | None = None,
                     dtype_bytes: int = 2) -> float:
    """Activation memory of one micro-batch: per hierarchy level, its positions (bytes / the
    product of the compression ratios above it) times what each block keeps for its backward
    (from the layer widths: block input; Mamba-2 in_proj output, conv output, scan output and
    gated norm; attention q/k/v, output and softmax statistics; MLP fc1 output and gate); with
    checkpointing only each block's input, plus one block recomputed at a time."""
    from pretrain.model.config import parse_layout

    ratios = list(model_cfg.ratio_targets if ratios is None else ratios)
    total, largest_block, positions = 0.0, 0.0, float(micro_batch_bytes)
    for s in range(model_cfg.num_stages + 1):
        d = model_cfg.d_model[s]
        ssm = model_cfg.ssm_cfg
        d_inner = ssm.expand * d
        conv_dim = d_inner + 2 * ssm.ngroups * ssm.d_state
        mlp = model_cfg.d_intermediate[s]
        for layout in model_cfg.stage_layout(s):
            if isinstance(layout, list):
                continue
            for letter, count in parse_layout(layout):
                mixer = (2 * d_inner + 2 * conv_dim + d_inner) if letter in "mM" else (4 * d + 2)
                block = d + mixer + (d + 3 * mlp if letter in "MT" else 0)
                largest_block = max(largest_block, block * positions)
                total += count * (d if checkpointing else block) * positions
        total += 3 * d * positions  # routing (q, k, p), residual projection, dechunk output
        if s < model_cfg.num_stages:
            positions /= ratios[s]
    if checkpointing:
        total += largest_block
    total += 2 * model_cfg.vocab_size * micro_batch_bytes  # logits (bf16) and their fp32 softmax rows
    return total * dtype_bytes


# ----------------------------------------------------------------------------- layouts
@dataclass
class Layout:
    zero: str
    pipeline_stages: int
    dp: int
    micro_batches: int  # per data-parallel replica and step
    checkpointing: bool
    memory_gb: float
    state_gb: float
    activations_gb: float
    comm_gb: float
    comm_s: float
    compute_s: float
    bubble: float
    step_s: float
    bytes_per_s: float
    mfu: float
    fits: bool


def evaluate(model_cfg, cluster: Cluster, global_batch_bytes: int, micro_batch_bytes: int, zero: str, pp: int,
             checkpointing: bool, efficiency: float, numels: list[int],
             elem_bytes: list[int] | None = None) -> Layout | None:
    from pretrain.model.flops import flops_per_byte, level_flops_per_byte

    if cluster.world % pp:
        return None
    dp = cluster.world // pp
    m = max(1, math.ceil(global_batch_bytes / (micro_batch_bytes * dp)))
    share = 1.0
    if pp > 1:  # the costliest pipeline rank sets the pace; its parameters are about its FLOP share
        from parallel.pipeline import split_levels

        cost = level_flops_per_byte(model_cfg)
        share = max(sum(cost[i] for i in lv) for lv in split_levels(model_cfg, pp)) / sum(cost)
    stage_numels = [max(1, int(n * share)) for n in numels] if pp > 1 else numels
    state = sum(state_bytes(stage_numels, zero, dp).values())  # gradients counted whole-step resident
    acts = activation_bytes(model_cfg, micro_batch_bytes, checkpointing)
    in_flight = min(m, 2 * pp) if pp > 1 else 1  # the V schedule holds up to 2p micro-batches
    memory = state + acts * in_flight + OVERHEAD_GB * 1e9
    comm = wire_bytes(comm_bytes(stage_numels, zero, dp, m, elem_bytes=elem_bytes), dp)
    bw = (cluster.intra_gbps if cluster.nodes == 1 or dp <= cluster.gpus_per_node else cluster.inter_gbps) * 1e9
    comm_s = comm / bw
    if zero == "zero3_offload":
        comm_s += 2 * sum(stage_numels) * 4 / (25e9)  # parameters and gradients over PCIe once a step
    step_flops = flops_per_byte(model_cfg) * global_batch_bytes
    compute_s = step_flops * share / (dp * cluster.peak_tflops * 1e12 * efficiency)  # pp 1: share 1, dp = world
    bubble = (2 * (pp - 1) / (3 * m)) / (1 + 2 * (pp - 1) / (3 * m)) if pp > 1 else 0.0
    step_s = compute_s / (1 - bubble) + comm_s * (0.3 if zero == "zero3" else 1.0)  # ZeRO-3 overlaps most gathers
    return Layout(zero, pp, dp, m, checkpointing, memory / 1e9, state / 1e9, acts * in_flight / 1e9, comm / 1e9,
                  comm_s, compute_s, bubble, step_s, global_batch_bytes / step_s,
                  step_flops / step_s / (cluster.world * cluster.peak_tflops * 1e12),
                  memory / 1e9 <= cluster.memory_gb)


def plan(model_cfg, cluster: Cluster, global_batch_bytes: int, micro_batch_bytes: int,
         efficiency: float = 0.45) -> list[Layout]:
    numels, elem_bytes = parameter_sizes(model_cfg, "bf16")  # the runs it recommends train in bf16
    out = []
    for zero in ZERO_LAYOUTS:
        for pp in range(1, model_cfg.num_stages + 2):
            if pp > 1 and zero != "zero3":
                continue  # the pipeline runs one ZeRO-3 engine per stage
            for ckpt in (False, True):
                lay = evaluate(model_cfg, cluster, global_batch_bytes, micro_batch_bytes, zero, pp, ckpt, efficiency,
                               numels, elem_bytes)
                if lay is not None:
                    out.append(lay)
    return sorted(out, key=lambda l: (not l.fits, l.step_s))


def command_for(best: Layout, config_path: str, cluster: Cluster) -> str:
    ds = "ds_configs/zero3_offload.json" if best.zero == "zero3_offload" else f"ds_configs/{best.zero}.json"
    overrides = [f"train.ds_config={ds}", "train.precision=bf16"]
    if best.pipeline_stages > 1:
        overrides.append(f"parallel.pipeline_stages={best.pipeline_stages}")
    if best.checkpointing:
        overrides.append("train.activation_checkpointing=true")
    return (f"sbatch --nodes={cluster.nodes} --ntasks-per-node={cluster.gpus_per_node} "
            f"--gpus-per-node={cluster.gpus_per_node} cluster/slurm/train.sbatch {config_path} " + " ".join(overrides))


def load_model_config(path: str) -> tuple:
    """(HNetConfig, the YAML's data section or {}) of an experiment YAML or a public config JSON."""
    import yaml

    from pretrain.model import HNetConfig
    from pretrain.model.config import model_section_dict

    if path.endswith(".json"):
        return HNetConfig.from_json(path), {}
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return HNetConfig.from_dict(model_section_dict(raw.get("model") or {})), raw.get("data") or {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="experiment YAML or public H-Net config JSON")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu", default="H100", help=f"{'|'.join(GPUS)} or NAME:TFLOPS:GB")
    ap.add_argument("--global-batch-bytes", type=int, default=0, help="default: the config's data.step_bytes")
    ap.add_argument("--micro-batch-bytes", type=int, default=0, help="default: the config's data.micro_batch_bytes")
    ap.add_argument("--efficiency", type=float, default=0.45, help="achievable share of the peak for the compute")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    for flag, value in (("--nodes", a.nodes), ("--gpus-per-node", a.gpus_per_node)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    if not 0 < a.efficiency <= 1:
        ap.error(f"--efficiency is a share of the peak, in (0, 1]; got {a.efficiency}")
    for flag, value in (("--global-batch-bytes", a.global_batch_bytes), ("--micro-batch-bytes", a.micro_batch_bytes)):
        if value < 0:
            ap.error(f"{flag} must be > 0 (0 = the config's), got {value}")
    if not os.path.isfile(a.config):
        ap.error(f"{a.config}: no such file")
    model_cfg, data = load_model_config(a.config)
    gbb = a.global_batch_bytes or int(data.get("step_bytes", 256 * 8192))  # the paper's 256 x 8192 bytes
    mbb = a.micro_batch_bytes or int(data.get("micro_batch_bytes", 8192))
    cluster = cluster_of(a.nodes, a.gpus_per_node, a.gpu)
    layouts = plan(model_cfg, cluster, gbb, mbb, a.efficiency)
    print(f"{a.config} on {cluster.world} x {cluster.gpu} ({cluster.memory_gb:g} GB), {gbb:,} bytes per step, "
          f"micro-batches of {mbb:,} bytes")
    print(f"{'layout':34s} {'mem GB':>7s} {'state':>6s} {'acts':>6s} {'comm GB':>8s} {'step s':>7s} {'bubble':>6s} "
          f"{'MB/s':>8s} {'MFU':>5s}")
    for lay in layouts:
        name = f"{lay.zero} pp{lay.pipeline_stages} dp{lay.dp} m{lay.micro_batches}{' ckpt' if lay.checkpointing else ''}"
        print(f"{name:34s} {lay.memory_gb:7.1f} {lay.state_gb:6.1f} {lay.activations_gb:6.1f} {lay.comm_gb:8.2f} "
              f"{lay.step_s:7.3f} {lay.bubble:6.2f} {lay.bytes_per_s / 1e6:8.2f} {lay.mfu:5.2f}"
              f"{'' if lay.fits else '  does not fit'}")
    fitting = [l for l in layouts if l.fits]
    if fitting:
        print(f"\nrecommended: {command_for(fitting[0], a.config, cluster)}")
    else:
        print("\nno layout fits: more GPUs, a smaller micro-batch, or zero3_offload with checkpointing")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cluster": asdict(cluster), "layouts": [asdict(l) for l in layouts],
                       "recommended": command_for(fitting[0], a.config, cluster) if fitting else None}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
