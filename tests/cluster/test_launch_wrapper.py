"""The srun launch wrapper (cluster/launch.sh): SLURM task variables -> torch.distributed's.

The mapping tests set SLURM's variables by hand and need no cluster; the last test runs the
wrapper under a real `srun` with 2 tasks on the local cluster.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.cluster.slurm_harness import LAUNCH, LOCAL_SLURM, REPO, run_script

MAPPED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
          "DS_ACCELERATOR", "OMP_NUM_THREADS")
PRINT_ENV = [sys.executable, "-c", f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {MAPPED!r}}}))"]
NO_GPU = not glob.glob("/proc/driver/nvidia/gpus/*")


def wrap(slurm: dict[str, str], command=None, extra: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the wrapper with only PATH, the given SLURM variables and `extra` in the environment."""
    env = {"PATH": os.environ["PATH"], **slurm, **(extra or {})}
    return subprocess.run([str(LAUNCH), *(PRINT_ENV if command is None else command)], env=env,
                          capture_output=True, text=True, timeout=60)


def mapped(slurm: dict[str, str], extra: dict | None = None) -> dict:
    res = wrap(slurm, extra=extra)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def one_task(**over: str) -> dict[str, str]:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "1"}
    env.update(over)
    return env


def test_one_task():
    got = mapped(one_task())
    assert got["RANK"] == "0" and got["WORLD_SIZE"] == "1" and got["LOCAL_RANK"] == "0"
    assert got["LOCAL_WORLD_SIZE"] == "1" and got["NODE_RANK"] == "0"
    assert got["MASTER_ADDR"] == "localhost"
    assert got["MASTER_PORT"] == str(15000 + 4242 % 15000)
    assert got["OMP_NUM_THREADS"] == "1"
    if NO_GPU:
        assert got["DS_ACCELERATOR"] == "cpu"


@pytest.mark.parametrize("procid", ["0", "1"])
def test_two_tasks_on_one_node(procid):
    got = mapped(one_task(SLURM_PROCID=procid, SLURM_LOCALID=procid, SLURM_NTASKS="2",
                          SLURM_STEP_TASKS_PER_NODE="2", SLURM_JOB_ID="31337"))
    assert (got["RANK"], got["LOCAL_RANK"], got["WORLD_SIZE"], got["LOCAL_WORLD_SIZE"]) == (procid, procid, "2", "2")
    # Both tasks derive the same rendezvous from the job id alone.
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("localhost", str(15000 + 31337 % 15000))


def test_two_tasks_on_two_nodes_master_is_first_host():
    # Second node's task: rank 1, local rank 0, master on the first host of the compressed list.
    got = mapped(one_task(SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NODEID="1", SLURM_NTASKS="2",
                          SLURM_JOB_NODELIST="gpu[007-008]", SLURM_STEP_TASKS_PER_NODE="1(x2)"))
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"], got["NODE_RANK"]) == \
        ("1", "2", "0", "1", "1")
    assert got["MASTER_ADDR"] == "gpu007"


def test_uneven_tasks_per_node():
    # 5 tasks as 2,2,1 over three nodes: the last task is alone on node 2.
    got = mapped(one_task(SLURM_PROCID="4", SLURM_LOCALID="0", SLURM_NODEID="2", SLURM_NTASKS="5",
                          SLURM_JOB_NODELIST="a1,b2,c3", SLURM_STEP_TASKS_PER_NODE="2(x2),1"))
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"], got["NODE_RANK"]) == \
        ("4", "5", "0", "1", "2")
    assert got["MASTER_ADDR"] == "a1"


def test_cpus_per_task_and_overrides():
    got = mapped(one_task(SLURM_CPUS_PER_TASK="4", SLURM_JOB_NODELIST="a1,b2"),
                 extra={"DS_ACCELERATOR": "cuda", "HNET_MASTER_PORT": "23456"})
    assert got["OMP_NUM_THREADS"] == "4"
    assert got["DS_ACCELERATOR"] == "cuda"  # an explicit choice is never overridden
    assert got["MASTER_PORT"] == "23456"
    assert got["MASTER_ADDR"] == "a1"


@pytest.mark.parametrize("missing", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
                                     "SLURM_JOB_NODELIST"])
def test_missing_variable_is_named(missing):
    env = one_task()
    del env[missing]
    res = wrap(env)
    assert res.returncode == 2
    assert f"{missing} is not set" in res.stderr and "srun" in res.stderr
    assert res.stdout == ""  # the command never ran


@pytest.mark.parametrize("over, message", [
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
    ({"SLURM_NTASKS": "0"}, "SLURM_NTASKS=0"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not a non-negative integer"),
    ({"SLURM_PROCID": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_NTASKS": "5",
      "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}, "SLURM_LOCALID=1 is not below the 1 tasks on node 2"),
    ({"SLURM_NODEID": "3", "SLURM_NTASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"},
     "SLURM_NODEID=3 has no entry"),
])
def test_inconsistent_variables_fail_clearly(over, message):
    res = wrap(one_task(**over))
    assert res.returncode == 2, res.stdout
    assert message in res.stderr
    assert res.stdout == ""


def test_no_command():
    res = wrap(one_task(), command=[])
    assert res.returncode == 2 and "no command given" in res.stderr


@pytest.mark.slurm
@pytest.mark.timeout(900)  # the first SLURM test also installs and starts the cluster
def test_under_real_srun(slurm_cluster):
    # Starting an already running cluster is a no-op that still reports an idle node.
    rc, out = run_script([str(LOCAL_SLURM), "start"], timeout=60)
    assert rc == 0 and "already running" in out, out
    res = subprocess.run(["srun", "--ntasks=2", "--time=1", "--label", str(LAUNCH), *PRINT_ENV], cwd=REPO,
                         capture_output=True, text=True, timeout=90,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))})
    assert res.returncode == 0, res.stderr
    by_rank = {}
    for line in res.stdout.splitlines():
        label, _, payload = line.partition(": ")
        by_rank[int(label.strip())] = json.loads(payload)
    assert sorted(by_rank) == [0, 1]
    for task, got in by_rank.items():
        assert got["RANK"] == got["LOCAL_RANK"] == str(task)
        assert got["WORLD_SIZE"] == got["LOCAL_WORLD_SIZE"] == "2"
        assert got["MASTER_ADDR"] == "localhost"
    assert by_rank[0]["MASTER_PORT"] == by_rank[1]["MASTER_PORT"]


def test_master_is_first_host_of_the_step_not_the_job():
    got = mapped(one_task(SLURM_JOB_NODELIST="a1,b2,c3", SLURM_STEP_NODELIST="b2,c3"))
    assert got["MASTER_ADDR"] == "b2"


@pytest.mark.parametrize("visible, local_rank", [("3", "0"), ("0,1,2,3", "3"), (None, "3")])
def test_gpu_per_task_binding(visible, local_rank):
    """With --gpus-per-task=1 SLURM binds one GPU to each task (CUDA_VISIBLE_DEVICES=3 for the
    fourth task): it sees a single device 0, and DeepSpeed's set_device(LOCAL_RANK) needs 0 there,
    not the node-local id 3. With the node's GPUs visible, LOCAL_RANK stays the node-local id."""
    extra = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    env = one_task(SLURM_PROCID="3", SLURM_LOCALID="3", SLURM_NTASKS="4", SLURM_STEP_TASKS_PER_NODE="4")
    res = wrap(env, extra=extra, command=[sys.executable, "-c",
                                          "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
                                          "('LOCAL_RANK', 'NODE_LOCAL_RANK', 'RANK')}))"])
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"LOCAL_RANK": local_rank, "NODE_LOCAL_RANK": "3", "RANK": "3"}


def test_python_mapping_is_the_wrappers():
    """A bare `srun python -m pretrain.train` maps the variables with the same code as the wrapper."""
    from parallel.distributed import map_launcher_env

    env = one_task(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4", SLURM_STEP_TASKS_PER_NODE="2(x2)",
                   SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[007-008]", SLURM_STEP_ID="0", CUDA_VISIBLE_DEVICES="5")
    got = map_launcher_env(env)
    wrapped = mapped({k: v for k, v in env.items()})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert got[k] == wrapped[k], k
    assert got["LOCAL_RANK"] == "0" and got["MASTER_ADDR"] == "gpu007"


# Every layout the multi-host tests run (tests/cluster/test_multihost.py), task by task: the
# whole node's GPUs visible (LOCAL_RANK is the node-local id) and one GPU bound per task
# (--gpus-per-task=1: each task sees only its own device, so LOCAL_RANK is 0).
LAYOUTS = {"2 hosts x 2": ("hnet[1-2]", [2, 2]), "3 hosts x 1": ("hnet[1-3]", [1, 1, 1]),
           "2 hosts x 1": ("hnet[1-2]", [1, 1])}


@pytest.mark.parametrize("bound", [False, True], ids=["node GPUs visible", "one GPU per task"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_multi_host_layouts(layout, bound):
    nodelist, per_node = LAYOUTS[layout]
    spec = ",".join(str(n) for n in per_node)
    world, rank = sum(per_node), 0
    for node, n in enumerate(per_node):
        for local in range(n):
            extra = {"CUDA_VISIBLE_DEVICES": str(local)} if bound else {}
            got = mapped(one_task(SLURM_PROCID=str(rank), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                                  SLURM_NTASKS=str(world), SLURM_JOB_NODELIST=nodelist,
                                  SLURM_STEP_TASKS_PER_NODE=spec, SLURM_JOB_ID="77"), extra=extra)
            want = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0" if bound else str(local),
                    "LOCAL_WORLD_SIZE": str(n), "NODE_RANK": str(node), "MASTER_ADDR": "hnet1",
                    "MASTER_PORT": str(15077)}
            assert {k: got[k] for k in want} == want, (layout, rank)
            rank += 1
