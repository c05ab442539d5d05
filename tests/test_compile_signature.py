"""The per-call signature: which train/eval flags it reads, and that flipping any flag that matters respecialises."""
import inspect

import pytest
import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from deeppcr_fx.signature import _TRAINING_FREE, training_sensitive as _training_sensitive
from compile_zoo import Stack


def _forward_sources(cls) -> str:
    return "".join(inspect.getsource(k.forward) for k in cls.__mro__
                   if issubclass(k, nn.Module) and k is not nn.Module and "forward" in vars(k))


@pytest.mark.parametrize("cls", sorted(_TRAINING_FREE, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_training_free_classes_never_read_the_flag(cls):
    # a torch release whose forward starts reading self.training must leave this list
    assert "training" not in _forward_sources(cls)


def test_flag_sensitive_modules_of_a_deep_mlp_are_its_own_classes():
    model = Stack([nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Dropout(0.1)) for _ in range(64)])
    sensitive = _training_sensitive(model)
    assert model in sensitive and all(type(m) in (Stack, nn.Dropout) for m in sensitive)
    assert len(sensitive) == 1 + 64


class _Noisy(nn.Module):
    """A user block that reads its own flag: in training it adds a constant."""

    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w, w)

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        return y + 1.0 if self.training else y


@pytest.mark.parametrize("policy", ["always", "never"])
def test_flipping_a_user_block_flag_directly_respecialises(policy):
    torch.manual_seed(0)
    model = Stack([_Noisy(6) for _ in range(8)]).double()
    compiled = deeppcr.compile(model, policy=policy)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        model.blocks[5].training = False  # not through .eval(): the signature must still see it
        torch.testing.assert_close(compiled(x), model(x))
    assert compiled.specialisations == 2


def test_flipping_a_dropout_flag_directly_respecialises():
    torch.manual_seed(0)
    model = Stack([nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Tanh()) for _ in range(8)]).double()
    compiled = deeppcr.compile(model, policy="auto")
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        compiled(x)
        assert compiled.report.reasons() == [deeppcr.Reason.RANDOMNESS]
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.training = False
        compiled(x)
    assert compiled.specialisations == 2 and deeppcr.Reason.RANDOMNESS not in compiled.report.reasons()


def test_flipping_a_linear_flag_keeps_the_specialisation():
    torch.manual_seed(0)
    model = Stack([nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(8)]).double()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        compiled(x)
        model.blocks[2][0].training = False  # a Linear computes the same either way
        torch.testing.assert_close(compiled(x), model(x))
    assert compiled.specialisations == 1
