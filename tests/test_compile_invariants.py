"""What compile must keep: the user's model untouched, its Parameters shared, specialisation per signature."""
import copy

import torch
import torch.nn as nn

import deeppcr_fx as deeppcr
from compile_zoo import NormBlock, Residual, Stack, mlp


def _model():
    torch.manual_seed(0)
    return Stack([NormBlock(8) for _ in range(8)] + [Residual(8) for _ in range(8)]).double()


def test_model_not_modified():
    model = _model()
    before_state = copy.deepcopy(model.state_dict())
    before_attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    before_repr = repr(model)
    compiled = deeppcr.compile(model, policy="always")
    compiled(torch.randn(3, 8, dtype=torch.float64))
    assert repr(model) == before_repr
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before_attrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k])
    assert type(model.blocks[0]) is NormBlock


def test_shares_parameters_and_state_dict_keys():
    model = _model()
    compiled = deeppcr.compile(model, policy="always")
    compiled(torch.randn(3, 8, dtype=torch.float64))
    assert list(compiled.state_dict()) == list(model.state_dict())
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in compiled.parameters()} == ids
    gm = compiled.graph_module
    assert {id(p) for p in gm.parameters()} <= ids  # the emitted graph holds no copies


def test_optimizer_step_through_compiled_updates_original():
    model = _model()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 8, dtype=torch.float64)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    w_before = model.blocks[3].lin.weight.detach().clone()
    compiled(x).square().sum().backward()
    assert model.blocks[3].lin.weight.grad is not None
    opt.step()
    assert not torch.equal(model.blocks[3].lin.weight, w_before)
    # the next call sees the updated weights (stacks are built at call time)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-9)
    assert compiled.specialisations == 1


def test_train_eval_propagate_and_respecialise():
    torch.manual_seed(0)
    model = Stack([nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.Tanh()) for _ in range(8)]).double()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 8, dtype=torch.float64)
    compiled.eval()
    assert not model.training and not model.blocks[0][1].training
    compiled(x)
    assert len(compiled.report.rewritten) == 1
    compiled.train()
    assert model.training and model.blocks[0][1].training
    compiled(x)
    assert compiled.report.reasons() == [deeppcr.Reason.RANDOMNESS]
    compiled.eval()
    compiled(x)
    assert compiled.specialisations == 2


def test_respecialise_on_batch_size_and_dtype():
    torch.manual_seed(0)
    model, (x,), expected = mlp(L=8, dtype=torch.float32)
    compiled = deeppcr.compile(model, example_inputs=(x,), policy="always")
    assert compiled.specialisations == 1 and [(c.length, c.period) for c in compiled.report.rewritten] == expected
    for batch in (3, 5, 3):
        y = torch.randn(batch, 8)
        torch.testing.assert_close(compiled(y), model(y), rtol=1e-4, atol=1e-5)
    assert compiled.specialisations == 2
    model.double()
    y = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(compiled(y), model(y), rtol=1e-9, atol=1e-9)
    assert compiled.specialisations == 3
    assert "float64[4, 8]" in compiled.report.signature


def test_lint_and_code_printable():
    model = _model()
    compiled = deeppcr.compile(model, policy="always")
    compiled(torch.randn(3, 8, dtype=torch.float64))
    gm = compiled.graph_module
    gm.graph.lint()
    code = gm.code
    assert "pcr_solve_0" in code and "self.pcr_solve_0_per_step_0()" in code
    assert "PCRSolve(" in repr(gm) and "L=8, period=1, mode=full" in repr(gm)
    assert "StackedAttributes(" in repr(gm) and "(8 tensors)" in repr(gm)



def test_explain_does_not_rewrite_by_default_on_cpu():
    model = _model()
    report = deeppcr.explain(model, (torch.randn(3, 8, dtype=torch.float64),))
    assert [c.length for c in report.chains] == [8, 8]
    assert report.reasons() == [deeppcr.Reason.NOT_PROFITABLE] * 2
    report = deeppcr.explain(model, (torch.randn(3, 8, dtype=torch.float64),), policy="always")
    assert [c.length for c in report.rewritten] == [8, 8]


def test_keyword_inputs_give_the_positional_result():
    model = _model()
    compiled = deeppcr.compile(model, policy="always")
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(compiled(x=x), model(x), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-11)
    assert compiled.report.rewritten
