"""One data-parallel rank of the distributed loader test (run by test_data_distributed.py).

    python dist_loader_run.py RANK WORLD PORT INDEX BAD_INDEX OUT.pkl   (BAD_INDEX/../../tiny/index.json: 1 doc)

Records, for this rank: step digests of an uninterrupted run with the state after every step,
the digests after resuming from two of those states (one resume crosses the epoch boundary),
a one-epoch run's micro-batches with its state part way, and the error of a fail-policy run.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dp_testutil import step_digest  # noqa: E402

from data_pipeline import BalancedStepLoader, DataError  # noqa: E402

C, STEP, WORKERS, SEED = 1024, 4096, 2, 11


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    index, bad_index, out_path = sys.argv[4], sys.argv[5], sys.argv[6]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))

    def make(**kw):
        return BalancedStepLoader([index], C, STEP, dp_rank=rank, dp_world=world, num_workers=WORKERS,
                                  seed=SEED, **kw)

    res = {}
    # uninterrupted run, the state after every step
    loader, digests, epochs, states = make(), [], [], [None]
    for step in loader:
        digests.append(step_digest(step))
        epochs.append(step.epoch)
        states.append(pickle.dumps(loader.state_dict()))
        assert len(step.micro_batches) == loader.per_rank
        if len(digests) == 55:
            break
    loader.close()
    res["digests"], res["epochs"] = digests, epochs
    # identical on every rank: compare hashes of the pickled states
    hashes = [None] * world
    dist.all_gather_object(hashes, [hashlib.sha256(s).hexdigest() for s in states[1:]])
    res["states_identical"] = all(h == hashes[0] for h in hashes)
    # resume from an early step, and from just before the epoch boundary
    boundary = epochs.index(1)
    res["resumes"] = {}
    for k in (4, boundary - 3):
        resumed = make()
        resumed.load_state_dict(pickle.loads(states[k]))
        got = []
        for step in resumed:
            got.append(step_digest(step))
            if len(got) == 8:
                break
        resumed.close()
        res["resumes"][k] = got
    # one epoch: every micro-batch, and the state after step 6 (resumed at dp_world=1 by the test)
    one = make(epochs=1)
    mbs, res["state6"], n = [], None, 0
    for step in one:
        n += 1
        mbs.append(step.micro_batches)
        if n == 6:
            res["state6"] = one.state_dict()
    res["epoch_mbs"] = mbs
    # a shard set with one document: rank 1 reads nothing, yet both ranks run the same steps
    tiny = BalancedStepLoader([os.path.join(os.path.dirname(bad_index), "..", "tiny", "index.json")], C, STEP,
                              dp_rank=rank, dp_world=world, num_workers=WORKERS, epochs=1)
    res["tiny"] = [[(mb.n_targets, mb.keys) for mb in step.micro_batches] for step in tiny]
    # fail policy on a missing shard: every rank raises, none hangs in a gather
    try:
        for _ in BalancedStepLoader([bad_index], C, STEP, dp_rank=rank, dp_world=world, num_workers=WORKERS,
                                    on_error="fail", epochs=1):
            pass
        res["fail_error"] = None
    except DataError as e:
        res["fail_error"] = str(e)
    with open(out_path, "wb") as f:
        pickle.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
