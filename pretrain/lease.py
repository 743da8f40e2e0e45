"""One launch owns a run directory: a lease file, taken by global rank 0, with a heartbeat.

`<run_dir>/run.lease` is a small JSON document: the holder (host, PID, SLURM job id and restart
count when present, the launch id every rank of one launch shares, start time), a random token,
and the time of its last heartbeat, rewritten every `heartbeat_s` seconds. A start that finds a
lease refuses at once, naming the holder, unless

- the heartbeat is older than `stale_after_s` (the holder crashed or was killed: the lease is
  taken over, and the take-over is logged and tagged in MLflow), or
- the holder ran on this host and its process is gone (a SIGKILLed run restarted on the same
  node need not wait for staleness), or
- the lease belongs to the same SLURM job (a requeued job, same job id and a higher restart
  count, takes its own lease back without waiting).

Shared file systems do not make `flock` reliable, so nothing here relies on OS locks: a lease is
written whole (a temporary file, then `os.replace`, atomic on POSIX and on NFS), a new one is
created whole too (a temporary file hard-linked to the lease's name, which fails if it exists),
and after writing, the taker reads the file back after a settle delay and
keeps the lease only if its own token is still there (two takers of one stale lease: the last
writer wins and the other refuses). Staleness compares the heartbeat's wall-clock time with the
reader's clock, so hosts sharing a run directory are assumed to keep their clocks in step (NTP).

Every rank applies the same rule before any process group exists, so a second launch refuses on
all its ranks within a few seconds instead of its other ranks waiting for a rendezvous: rank 0
takes the lease; the others wait until the lease names their own launch, or refuse when it names
a live other one. The holder also checks at every heartbeat that the lease is still its own; a
lost lease (taken over by a launch that judged it stale) stops the run at the next step.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from pretrain.errors import ConfigError

LEASE_FILE = "run.lease"


class LeaseHeld(ConfigError):
    """The run directory is leased by another live launch."""


@dataclass
class Holder:
    host: str
    pid: int
    launch_id: str  # shared by every rank of one launch
    slurm_job_id: str
    slurm_restart_count: int
    start_time: float
    pid_start: str = ""  # the holder process's start time in the kernel's clock ticks (Linux), "" elsewhere

    @classmethod
    def this_process(cls, env=os.environ) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), launch_id(env), env.get("SLURM_JOB_ID", ""),
                   int(env.get("SLURM_RESTART_COUNT", "0") or 0), time.time(), process_start(os.getpid()))

    def is_gone(self) -> bool:
        """True only when it is certain: the holder ran on this host and that process no longer
        exists (or the PID now belongs to a process started later)."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        now = process_start(self.pid)
        if now is None:
            return True
        return bool(self.pid_start) and now != self.pid_start

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id} (restart {self.slurm_restart_count})" if self.slurm_job_id else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start_time))
        return f"pid {self.pid} on {self.host}{job}, started {started}"


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/PID/stat), "" where /proc is not
    there, None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def launch_id(env=os.environ) -> str:
    """What every rank of one launch has in common: the SLURM job and restart, or torchrun's run
    id, or the rendezvous address (a single process: its PID)."""
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT', '0') or '0'}"
    if env.get("TORCHELASTIC_RUN_ID") and env.get("TORCHELASTIC_RUN_ID") != "none":
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}:{env.get('MASTER_PORT', '')}"
    if env.get("WORLD_SIZE", "1") != "1":
        return f"rendezvous:{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


@dataclass
class LeaseRecord:
    holder: Holder
    token: str
    heartbeat: float

    @classmethod
    def read(cls, path: str) -> "LeaseRecord | None":
        try:
            with open(path) as f:
                d = json.load(f)
            return cls(Holder(**d["holder"]), d["token"], float(d["heartbeat"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            # a foreign or damaged file (this module writes a lease whole): its age decides
            age = time.time() - os.path.getmtime(path) if os.path.exists(path) else 0.0
            return cls(Holder("?", -1, f"unreadable:{e}", "", 0, 0.0, ""), "", time.time() - age)

    def to_json(self) -> str:
        return json.dumps({"holder": asdict(self.holder), "token": self.token, "heartbeat": self.heartbeat})


def may_take(current: LeaseRecord | None, me: Holder, stale_after_s: float, now: float | None = None) -> tuple[bool, str]:
    """(whether `me` may take the run directory, why): the rule every rank applies."""
    if current is None:
        return True, "no lease"
    now = time.time() if now is None else now
    age = now - current.heartbeat
    h = current.holder
    if h.launch_id == me.launch_id:
        return True, "our own launch"
    if me.slurm_job_id and h.slurm_job_id == me.slurm_job_id and me.slurm_restart_count >= h.slurm_restart_count:
        return True, f"taken back by requeued SLURM job {me.slurm_job_id} (restart {h.slurm_restart_count} -> " \
                     f"{me.slurm_restart_count})"
    if age > stale_after_s:
        return True, f"taken over from a stale lease ({h.describe()}; no heartbeat for {age:.0f} s)"
    if h.is_gone():
        return True, f"taken over from a lease whose holder has ended ({h.describe()}: no such process on this host)"
    return False, (f"the run directory is in use by another launch: {h.describe()}, last heartbeat {age:.0f} s ago. "
                   f"Stop that job first, or wait until its lease is older than train.lease_stale_s="
                   f"{stale_after_s:g} s if it is gone")


class RunLease:
    def __init__(self, run_dir: str, stale_after_s: float = 180.0, heartbeat_s: float = 5.0,
                 settle_s: float = 0.5, env=os.environ):
        self.path = os.path.join(run_dir, LEASE_FILE)
        self.run_dir, self.stale_after_s, self.heartbeat_s, self.settle_s = run_dir, stale_after_s, heartbeat_s, settle_s
        self.me = Holder.this_process(env)
        self.token = uuid.uuid4().hex
        self.how = ""  # why the lease was ours to take
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- rank 0
    def acquire(self) -> str:
        """Takes the lease or raises LeaseHeld; returns how it was taken."""
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(3):
            current = LeaseRecord.read(self.path)
            ok, why = may_take(current, self.me, self.stale_after_s)
            if not ok:
                raise LeaseHeld(why)
            if current is None:
                if not self._create():
                    continue  # somebody created it between our read and our create: decide again
            else:
                self._write()
            time.sleep(self.settle_s)
            after = LeaseRecord.read(self.path)
            if after is not None and after.token == self.token:
                self.how = why
                self._start_heartbeat()
                return why
            if after is not None:
                raise LeaseHeld(f"the run directory was just taken by another launch: {after.holder.describe()}")
        raise LeaseHeld(f"could not take the lease {self.path}: it changed under us three times")

    def _record(self) -> LeaseRecord:
        return LeaseRecord(self.me, self.token, time.time())

    def _create(self) -> bool:
        """Creates the lease whole, or returns False when one exists. The record is written to a
        temporary file first and hard-linked to the lease's name (link fails if the name exists,
        atomically, on POSIX file systems and NFS): a reader finds no lease or the whole record.
        Created in place with O_EXCL and then written, a rank of the same launch reading in
        between found an empty file, judged it a foreign fresh lease, and refused its own launch."""
        tmp = self._write_temporary()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: O_EXCL, with the short window above
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                self._dump(f)
            return True
        finally:
            os.remove(tmp)

    def _write_temporary(self) -> str:
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w") as f:
            self._dump(f)
        return tmp

    def _dump(self, f) -> None:
        f.write(self._record().to_json())
        f.flush()
        os.fsync(f.fileno())

    def _write(self) -> None:
        os.replace(self._write_temporary(), self.path)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = LeaseRecord.read(self.path)
            if current is None or current.token != self.token:
                self.lost.set()
                return
            try:
                self._write()
            except OSError:
                pass  # a file-system hiccup: the next beat tries again (staleness takes minutes)

    def release(self) -> None:
        """Gives the lease up (clean exits); a crash leaves it to go stale."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.heartbeat_s)
        current = LeaseRecord.read(self.path)
        if current is not None and current.token == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------------- the other ranks
    def wait_for_own_launch(self, timeout_s: float = 120.0, poll_s: float = 0.2) -> None:
        """Returns once the lease names this launch; raises LeaseHeld when it names a live other one."""
        deadline = time.time() + timeout_s
        while True:
            current = LeaseRecord.read(self.path)
            if current is not None and current.holder.launch_id == self.me.launch_id:
                return
            ok, why = may_take(current, self.me, self.stale_after_s)
            if not ok:
                raise LeaseHeld(why)
            if time.time() > deadline:
                raise LeaseHeld(f"rank 0 of this launch did not take the lease {self.path} within {timeout_s:g} s")
            time.sleep(poll_s)
