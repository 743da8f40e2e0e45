"""The generators a checkpoint saves per rank, CUDA's included, under another GPU binding.

CUDA cannot run here, so its generators are a stand-in with torch.cuda's calls (one state per
visible device; an index past them fails as CUDA's invalid device ordinal does). The Python,
NumPy and torch generators are the real ones."""
from __future__ import annotations

import random

import pytest
import torch

from pretrain.state import RNGState, TrainState


class VisibleGPUs:
    """torch.cuda's generator calls over `n` visible devices, this task on `current`."""

    def __init__(self, n: int, current: int, seed: int = 0):
        self.states = [torch.tensor([seed, d], dtype=torch.uint8) for d in range(n)]
        self.current = current

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return len(self.states)

    def current_device(self) -> int:
        return self.current

    def get_rng_state(self, device: int) -> torch.Tensor:
        return self.states[self._check(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int) -> None:
        self.states[self._check(device)] = state.clone()

    def manual_seed(self, seed: int) -> None:
        self.states[self.current] = torch.tensor([seed % 256, 255], dtype=torch.uint8)

    def _check(self, device: int) -> int:
        if not 0 <= device < len(self.states):
            raise RuntimeError("CUDA error: invalid device ordinal")
        return device


def test_a_rank_saves_its_own_device_and_resumes_under_one_gpu_per_task():
    """Saved by a torchrun rank on cuda:3 of eight visible, resumed by an srun task that sees one."""
    saved_under = VisibleGPUs(8, current=3, seed=7)
    state = RNGState(0, rank=3, train_state=TrainState(), cuda=saved_under).state_dict()
    assert torch.equal(state["cuda"], saved_under.states[3]), "this rank's device, and only it"
    resumed_under = VisibleGPUs(1, current=0)
    RNGState(0, rank=3, train_state=TrainState(), cuda=resumed_under).load_state_dict(state)
    assert torch.equal(resumed_under.states[0], saved_under.states[3])


def test_one_gpu_per_task_resumed_by_torchrun_sets_only_its_own_device():
    saved_under = VisibleGPUs(1, current=0, seed=9)
    state = RNGState(0, rank=5, train_state=TrainState(), cuda=saved_under).state_dict()
    resumed_under = VisibleGPUs(8, current=5)
    untouched = [s.clone() for s in resumed_under.states]
    RNGState(0, rank=5, train_state=TrainState(), cuda=resumed_under).load_state_dict(state)
    assert torch.equal(resumed_under.states[5], saved_under.states[0])
    assert all(torch.equal(a, b) for d, (a, b) in enumerate(zip(resumed_under.states, untouched)) if d != 5)


@pytest.mark.parametrize("visible, current, expect", [(2, 1, "saved"), (3, 0, "reseeded"), (1, 0, "reseeded")])
def test_an_older_checkpoint_with_every_visible_device(visible, current, expect):
    """Checkpoints of the earlier format hold a list, one state per device the rank could see:
    under the same number of visible devices, this rank's device's entry; under another binding
    (which entry was this rank's is unknown) CUDA's generator is reseeded, never an error."""
    saved_under = VisibleGPUs(2, current=1, seed=3)
    state = RNGState(0, rank=1, train_state=TrainState(), cuda=saved_under).state_dict()
    state["cuda"] = [saved_under.get_rng_state(d) for d in range(2)]
    resumed_under = VisibleGPUs(visible, current=current)
    RNGState(11, rank=1, train_state=TrainState(step=4), cuda=resumed_under).load_state_dict(state)
    got = resumed_under.states[current]
    if expect == "saved":
        assert torch.equal(got, saved_under.states[1])
    else:
        assert torch.equal(got, torch.tensor([(11 + 1000003 * 4 + 1) % 256, 255], dtype=torch.uint8))


def test_the_host_generators_are_restored_exactly():
    gen = RNGState(0, rank=0, train_state=TrainState(), cuda=VisibleGPUs(1, current=0))
    state = gen.state_dict()
    expected = (random.random(), torch.rand(3))
    random.random(), torch.rand(3)
    gen.load_state_dict(state)
    again = (random.random(), torch.rand(3))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])
