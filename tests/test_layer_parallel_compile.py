"""``deeppcr.compile(model, group=...)``: a model's chain split by depth over ranks (gloo, 2 and 3 processes).

The model (an input layer, 24 tanh blocks in a Python loop, a head) is traced and its chain found
by the compiler; each rank keeps its slice of the blocks, the first rank the input layer, the last
the head. Ten SGD steps give the losses and Parameters of the whole model trained in one process.
"""
import pytest
import torch
import torch.distributed as dist

from distributed_helpers import spawn_group

import deeppcr_fx as deeppcr

TOL = 1e-10


def _check(outs, nprocs):
    n_blocks = 24
    starts = [n_blocks * r // nprocs for r in range(nprocs + 1)]
    assert [o["blocks"] for o in outs] == list(zip(starts[:-1], starts[1:]))
    for rank, o in enumerate(outs):
        assert o["params"] < TOL, (rank, o["params"])
        assert o["moved"] > 1e-4  # training changed this rank's weights
        assert o["stats"] == outs[0]["stats"]
        assert o["rewritten"] == 1
        assert o["out"] is (rank == nprocs - 1)
        blocks = {f"blocks.{i}.lin.weight" for i in range(*o["blocks"])}
        assert blocks <= set(o["names"])  # each rank trains exactly its slice (and its ends)
        assert not any(n.startswith("blocks.") and n.endswith("weight") and n not in blocks for n in o["names"])
        assert ("pre.weight" in o["names"]) is (rank == 0)
        assert ("post.weight" in o["names"]) is (rank == nprocs - 1)
    assert outs[-1]["losses"] < TOL and outs[0]["losses"] is None


@pytest.mark.parametrize("nprocs", [2, 3])
def test_training_matches_one_process(tmp_path, nprocs):
    outs = [o for o in spawn_group("run_compiled_model", nprocs, tmp_path, False)]
    _check(outs, nprocs)
    assert all(o["meta_left"] == 0 for o in outs)


def test_meta_model_materialises_only_this_ranks_slice(tmp_path):
    outs = spawn_group("run_compiled_model", 2, tmp_path, True)
    _check(outs, 2)
    total = 24 * 2 + 4  # every block's weight and bias, the input layer's and the head's
    for rank, o in enumerate(outs):
        assert o["meta_left"] == total - len(o["names"]) > 0, (rank, o["meta_left"], len(o["names"]))


def test_intermediate_states_read_outside_the_chain_are_refused(tmp_path, monkeypatch):
    """A model returning every layer's output cannot hand on only the final state: a clear error."""
    store = tmp_path / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        class Collect(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(12)])

            def forward(self, x):
                outs = []
                for layer in self.layers:
                    x = torch.tanh(layer(x))
                    outs.append(x)
                return torch.stack(outs).sum(0) + x

        with pytest.raises(deeppcr.CompileError, match="intermediate state"):
            deeppcr.compile(Collect(), example_inputs=(torch.randn(2, 4),), group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_a_changed_python_value_raises_instead_of_a_stale_answer(tmp_path):
    """A loop length the build read changes: the next call raises (every rank's part is fixed)."""
    store = tmp_path / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        class Loop(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 4)
                self.steps = 12

            def forward(self, x):
                for _ in range(self.steps):
                    x = torch.tanh(self.layer(x))
                return x

        model = Loop().double()
        x = torch.randn(2, 4, dtype=torch.float64)
        compiled = deeppcr.compile(model, example_inputs=(x,), group=dist.group.WORLD)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-11)
        model.steps = 16
        with pytest.raises(deeppcr.CompileError, match="Loop.steps changed"):
            compiled(x)
    finally:
        dist.destroy_process_group()
