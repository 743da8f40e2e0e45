"""PrefetchingLoader: builds the next step's batch in a background thread while this step trains.

Building a step (reading, gathering over the data-parallel ranks, balancing, packing) is host
work; done between two steps, the accelerator waits for it. Here the step after the one just
handed out is built in one background thread (one step ahead, no more), so it overlaps the
training of the current step.

Exact resume. The batch being built is not consumed: `state_dict()` is the loader's state taken
when the last consumed batch was handed out (the builder idle then), so a run resumed from a
checkpoint after step N rebuilds step N+1 exactly. Updates of the loader's state that the trainer
asks for while a step is being built (the cost model's measured compression) could not reach that
step deterministically, so they are held and applied when the next batch is handed out, before
the build after it starts: an update asked for at step N reaches step N+2, however long a build
takes. Updates still held are part of the state and are held again on resume.

Errors raised by the builder (a corrupt shard with on_error=fail, an error on another rank) are
raised again, the same exception object, where the trainer asks for that batch.

Collectives. With several data-parallel ranks a build gathers over the loader's process group;
the main thread must not run collectives on that group meanwhile. The loader's group is its own
(data_pipeline.loader), and `settle()` waits for the build before anything else uses the group
(the held-out loaders share it).
"""
from __future__ import annotations

import copy
import threading

_END = object()


class PrefetchingLoader:
    """Wraps a loader with `__iter__`, `state_dict`, `load_state_dict` and `close` (a
    BalancedStepLoader). apply_update(loader, payload) applies an update held by `update`."""

    STATE_KEY = "prefetch_pending_updates"  # held updates, beside the wrapped loader's own keys

    def __init__(self, loader, apply_update=None):
        self.loader = loader
        self.apply_update = apply_update
        self._pending: list = []
        self._snapshot = loader.state_dict()
        self._thread: threading.Thread | None = None
        self._result = None
        self._iter = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The wrapped loader's state after the last consumed batch, and the held updates."""
        state = dict(self._snapshot)
        if self._pending:
            state[self.STATE_KEY] = copy.deepcopy(self._pending)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._stop()
        state = dict(state)
        self._pending = list(state.pop(self.STATE_KEY, []))
        self.loader.load_state_dict(state)
        self._snapshot = self.loader.state_dict()

    def update(self, payload) -> None:
        """Holds an update of the wrapped loader (see the module docstring for when it applies)."""
        self._pending.append(payload)

    @property
    def cost_model(self):
        return self.loader.cost_model

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        self._stop()
        self._iter = iter(self.loader)
        self._start()
        while True:
            batch = self._take()
            if batch is _END:
                return
            yield batch

    def _build(self, it) -> None:
        try:
            self._result = ("ok", next(it, _END))
        except BaseException as e:  # handed to the main thread as it is, message and type intact
            self._result = ("error", e)

    def _start(self) -> None:
        self._result = None
        self._thread = threading.Thread(target=self._build, args=(self._iter,), name="batch-prefetch", daemon=True)
        self._thread.start()

    def settle(self) -> None:
        """Waits until no build runs (its result is kept for the next batch)."""
        if self._thread is not None:
            self._thread.join()

    def _take(self):
        """The batch being built; then, the builder idle, the held updates, the state snapshot,
        and the start of the next build."""
        self.settle()
        kind, value = self._result
        self._thread = None
        if kind == "error":
            self._iter = None
            raise value
        if value is _END:
            return _END
        for payload in self._pending:
            if self.apply_update is not None:
                self.apply_update(self.loader, payload)
        self._pending = []
        self._snapshot = self.loader.state_dict()
        self._start()
        return value

    def _stop(self) -> None:
        """Waits for a running build and drops it with the iteration: it was never consumed, so the
        wrapped loader goes back to the state after the last consumed batch."""
        self.settle()
        self._thread, self._result = None, None
        if self._iter is not None:
            close = getattr(self._iter, "close", None)
            self._iter = None
            if close is not None:
                close()
            self.loader.load_state_dict(self._snapshot)

    def close(self) -> None:
        self._stop()
        self.loader.close()
