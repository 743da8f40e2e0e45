"""How a run is asked to stop: preemption signals and the STOP file, agreed on by all ranks.

SIGUSR1 / SIGTERM (SLURM's warning before a time limit or a preemption, `scancel --signal`)
only set a flag; at the next step boundary every rank learns whether any rank was signalled or
whether `RUN_DIR/STOP` exists (one all-reduce), so all save the same checkpoint and leave
together: "preempted" (requeue and resume) or "stopped" (for good).
"""
from __future__ import annotations

import os
import signal

from parallel.distributed import all_reduce_max

STOP_FILE = "STOP"


class SignalFlag:
    """SIGUSR1 / SIGTERM only set a flag; the loop acts on it at the next step boundary."""

    def __init__(self):
        self.raised = 0

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)
            # Restart interrupted system calls: a signal landing in a communication thread's
            # blocking read must not surface as a failed collective.
            signal.siginterrupt(sig, False)

    def _handler(self, signum, frame) -> None:
        self.raised = signum


class StopRequests:
    """`poll()` -> (signalled, stopped, lease_lost), the same on every rank. `lease_lost` is an
    Event set when another launch took the run directory over (pretrain/lease.py)."""

    def __init__(self, run_dir: str, flag: SignalFlag, lease_lost=None):
        self.stop_file = os.path.join(run_dir, STOP_FILE)
        self.flag, self.lease_lost = flag, lease_lost

    def poll(self) -> tuple[bool, bool, bool]:
        lost = self.lease_lost is not None and self.lease_lost.is_set()
        signalled, stopped, lost = all_reduce_max([float(self.flag.raised != 0), float(os.path.exists(self.stop_file)),
                                                   float(lost)])
        return bool(signalled), bool(stopped), bool(lost)
