"""One rank of the pipeline equivalence test (run by test_pipeline_equivalence.py).

Three optimizer steps over hand-made micro-batches of unequal byte counts (so their chunk
counts differ), four per step, fp32, with a gradient clip small enough that the clipped
global norm decides every update:
- `--mode plain`: plain PyTorch in one process, the reference;
- `--mode pipe --pp P` with WORLD_SIZE = P x DP: the hierarchy over P pipeline ranks, DP
  replicas per stage; replica d's first stage takes micro-batches d, d + DP, ...
`--p2p-log` also records the point-to-point sends, receives and waits the rank issues and the
process groups it creates (`record_p2p`), from the executor's start to the end of one
forward-only evaluation step after the training steps, into rank{r}_p2p.json: the input of the
NCCL ordering check in test_pipeline_equivalence.py.
Each writes, per step, the global loss, ratio loss, gradient norm and (before the optimizer
step) the full gradients of the parameters it holds, then the final parameters; pipeline ranks
also what they hold of every parameter (the sharding test).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "trainer"))

import equiv_worker  # noqa: E402  (its micro-batch maker and step type)

LENGTHS = [[[120, 380], [60, 333], [700], [90, 40, 200]],
           [[33, 17, 250], [512], [64, 64, 64], [401]],
           [[300], [150, 150], [9, 500], [222, 111]]]


def all_steps():
    gen = torch.Generator().manual_seed(4321)
    return [[equiv_worker.make_micro_batch(gen, lens, f"s{s}m{m}") for m, lens in enumerate(step)]
            for s, step in enumerate(LENGTHS)]


def to_list(t: torch.Tensor) -> list:
    return t.detach().float().cpu().tolist()


def record_p2p() -> dict:
    """Records, in issue order: each isend / irecv as [group name, this rank, peer, "send" |
    "recv", numel, dtype] ("ops"; torch names a group alike on every rank, all creating groups in
    one order), each wait on a receive as [its index in ops, ops issued before the wait] ("waits"),
    the receives of payloads a header received before had announced ("announced": the header's
    tensor count, read once it is in, says how many of the peer's next receives they are), and
    each new_group call as [ranks or None, backend, use_local_synchronization, timeout in seconds
    or None] ("groups")."""
    import torch.distributed as dist

    from parallel.pipeline.p2p import HEADER_LEN

    log: dict = {"ops": [], "waits": [], "announced": [], "groups": []}
    me = dist.get_rank()
    due: dict = {}  # (group, peer) -> payload receives its last header announced, not yet posted

    class Waited:
        def __init__(self, work, index, tensor, channel):
            self.work, self.index, self.tensor, self.channel = work, index, tensor, channel

        def wait(self, *args, **kwargs):
            log["waits"].append([self.index, len(log["ops"])])
            out = self.work.wait(*args, **kwargs)
            if self.index not in log["announced"] and self.tensor.numel() == HEADER_LEN \
                    and self.tensor.dtype == torch.int64:
                due[self.channel] = int(self.tensor[0])
            return out

    def wrap(real, kind):
        def issue(tensor, *args, group=None, **kwargs):
            peer = kwargs.get("dst", kwargs.get("src", args[0] if args else None))
            name = (group or dist.group.WORLD).group_name
            log["ops"].append([name, me, peer, kind, tensor.numel(), str(tensor.dtype)])
            index = len(log["ops"]) - 1
            work = real(tensor, *args, group=group, **kwargs)
            if kind == "send":
                return work
            if due.get((name, peer), 0) > 0:
                due[(name, peer)] -= 1
                log["announced"].append(index)
            return Waited(work, index, tensor, (name, peer))
        return issue

    real_new_group = dist.new_group

    def new_group(ranks=None, *args, **kwargs):
        timeout = kwargs.get("timeout")
        log["groups"].append([sorted(ranks) if ranks is not None else None, kwargs.get("backend"),
                              bool(kwargs.get("use_local_synchronization", False)),
                              timeout.total_seconds() if timeout is not None else None])
        return real_new_group(ranks, *args, **kwargs)

    dist.isend, dist.irecv, dist.new_group = wrap(dist.isend, "send"), wrap(dist.irecv, "recv"), new_group
    return log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mode", choices=["plain", "pipe"], required=True)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--schedule", default="v")
    ap.add_argument("--no-fix", action="store_true", help="leave out the ZeRO-3 accumulation fix")
    ap.add_argument("--p2p-log", action="store_true", help="record the point-to-point operations issued")
    a = ap.parse_args()

    from parallel.build import build_executor
    from parallel.distributed import init_process_group, setup_env
    from parallel.engine import resolve_ds_config
    from pretrain.config import load_config
    from pretrain.model import HNetConfig
    from pretrain.schedule import build_schedule

    overrides = [f"train.engine={'plain' if a.mode == 'plain' else 'deepspeed'}", "schedule.warmup_frac=0",
                 "schedule.decay_frac=0", "optim.lr=0.001", "optim.grad_clip=0.05"]
    if a.mode == "pipe":
        overrides += [f"parallel.pipeline_stages={a.pp}", f"parallel.schedule={a.schedule}"]
    cfg = load_config(str(REPO / "pretrain" / "configs" / f"{a.config}.yaml"), overrides, validate=False)
    info = setup_env()
    model_cfg = HNetConfig.from_dict(cfg.model_dict())
    dp = info.world_size // a.pp if a.mode == "pipe" else 1
    ds_config = resolve_ds_config(cfg, dp) if a.mode == "pipe" else None
    init_process_group(info, use_deepspeed=a.mode == "pipe")
    p2p_log = record_p2p() if a.p2p_log else None
    executor, group_mults, _ = build_executor(cfg, info, model_cfg, ds_config)
    if a.no_fix:
        executor.zero3_accumulate_fix = False
    schedule = build_schedule(cfg, 3)
    named = list(executor.module.named_parameters())
    grads: list[dict] = []

    def record_grads(ex) -> None:
        if a.mode == "plain":
            grads.append({n: to_list(p.grad) for n, p in named if p.grad is not None})
        else:
            from deepspeed.utils import safe_get_full_grad

            grads.append({n: to_list(safe_get_full_grad(p)) for n, p in named})  # a collective over the replicas

    executor.before_step = record_grads
    result = {"losses": [], "ratio_losses": [], "grad_norms": [], "compression": [], "grads": grads}
    for i, mbs in enumerate(all_steps(), start=1):
        mine = mbs if a.mode == "plain" else mbs[executor.dp_rank::dp]
        step = equiv_worker.Step(mine, global_targets=sum(m.n_targets for m in mbs),
                                 global_bytes=sum(m.n_bytes for m in mbs))
        if a.mode == "pipe":
            step = next(executor.batches([step])) if executor.reads_data else next(executor.batches(None))
        schedule.apply(executor.param_groups, i, group_mults)
        res = executor.train_step(step)
        result["losses"].append(res.loss)
        result["ratio_losses"].append(res.ratio_loss)
        result["grad_norms"].append(res.grad_norm)
        result["compression"].append(res.compression)
        if a.mode == "pipe":
            result.setdefault("bubble", []).append(res.extra_metrics)
    if a.mode == "plain":
        result["params"] = {n: to_list(p) for n, p in named}
        Path(a.out, "plain.json").write_text(json.dumps(result))
        return
    if p2p_log is not None:  # evaluation's forward-only order over the same ranks
        step = equiv_worker.Step(mbs[executor.dp_rank::dp], global_targets=sum(m.n_targets for m in mbs),
                                 global_bytes=sum(m.n_bytes for m in mbs))
        executor.eval_step(next(executor.batches([step])) if executor.reads_data else next(executor.batches(None)))
        Path(a.out, f"rank{info.rank}_p2p.json").write_text(json.dumps(p2p_log))
    import deepspeed

    held = {n: [int(p.ds_tensor.numel()), int(p.ds_numel)] for n, p in named}
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        result["params"] = {n: to_list(p) for n, p in named}
    result.update(stage=executor.me, dp_rank=executor.dp_rank, held=held)
    Path(a.out, f"rank{info.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
