"""The recording front end: a concrete run replayed as a graph."""
import pytest
import torch
import torch.nn as nn

from deeppcr_fx.passes.record import RecordFailure, record


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        mask = torch.zeros(4, dtype=x.dtype)
        mask[1] = 2.0  # in-place on a fresh tensor: must be replayed, not lost
        noise = torch.randn(x.shape, dtype=x.dtype)  # drawn again on every replay
        return self.lin(x) * mask + noise


def test_replay_matches_and_shares_parameters():
    torch.manual_seed(0)
    model = Masked().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    gm, out = record(model, (x,))
    torch.manual_seed(7)
    replay = gm(x)
    torch.manual_seed(7)
    torch.testing.assert_close(replay, model(x), rtol=0, atol=0)
    assert gm.get_parameter("lin.weight") is model.lin.weight
    assert not any(name.startswith("_recorded") for name, _ in model.named_buffers())
    replay.sum().backward()
    assert model.lin.weight.grad is not None


def test_reading_input_values_fails():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(RecordFailure, match="data-dependent"):
        record(Branchy(), (torch.ones(2, 2),))


def test_hooks_removed_after_recording():
    model = Masked()
    record(model, (torch.randn(2, 4),))
    assert not model.lin._forward_hooks and not model.lin._forward_pre_hooks
