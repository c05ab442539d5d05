"""First-call cost of the compiled backend: inductor's C++ vector-ISA probe remembered across processes
(``runtime/inductor_setup.py``), and a compiled solve with it still equal to the sequential loop."""
import json

import pytest
import torch

import deeppcr_fx as deeppcr
from deeppcr_fx.runtime import inductor_setup

cpu_vec_isa = pytest.importorskip("torch._inductor.cpu_vec_isa")


@pytest.fixture
def isa_file(tmp_path, monkeypatch):
    """A fresh remembered-probe file, the in-process memo forgotten before and after."""
    path = tmp_path / "isa.json"
    monkeypatch.setenv("DEEPPCR_ISA_CACHE", str(path))
    inductor_setup._MEMO.clear()
    yield path
    inductor_setup._MEMO.clear()


class Probe:
    """A stand-in for inductor's check_build: counts calls, answers ``ok``."""

    def __init__(self, ok=True):
        self.ok, self.calls = ok, 0

    def __call__(self, isa, code):
        self.calls += 1
        return self.ok


ISA = cpu_vec_isa.VecAVX2()


def _fresh_process():
    inductor_setup._MEMO.clear()  # what a new process starts with; the file stays


def test_a_success_is_remembered_in_the_file_and_not_probed_again(isa_file):
    probe = Probe()
    assert inductor_setup.remembered_check(ISA, "code", probe) is True and probe.calls == 1
    assert inductor_setup.entry_key(ISA, "code") in json.loads(isa_file.read_text())["ok"]
    _fresh_process()
    assert inductor_setup.remembered_check(ISA, "code", probe) is True and probe.calls == 1
    # another program or another ISA is another key: probed
    assert inductor_setup.remembered_check(ISA, "other code", probe) is True and probe.calls == 2
    assert inductor_setup.remembered_check(cpu_vec_isa.VecAVX512(), "code", probe) is True and probe.calls == 3


def test_a_key_of_another_machine_compiler_or_torch_falls_back_to_probing(isa_file, monkeypatch):
    machine = inductor_setup._machine
    monkeypatch.setattr(inductor_setup, "_machine", lambda compiler: machine(compiler) + "another g++")
    inductor_setup.remembered_check(ISA, "code", Probe())  # stored under the other machine's key
    monkeypatch.setattr(inductor_setup, "_machine", machine)
    _fresh_process()
    probe = Probe(ok=False)
    assert inductor_setup.remembered_check(ISA, "code", probe) is False and probe.calls == 1


def test_a_failure_is_not_stored(isa_file):
    probe = Probe(ok=False)
    assert inductor_setup.remembered_check(ISA, "code", probe) is False
    assert not isa_file.exists()
    _fresh_process()
    assert inductor_setup.remembered_check(ISA, "code", probe) is False and probe.calls == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 1, "ok": "KEY"}', '{"format": 99, "ok": ["KEY"]}'])
def test_a_corrupt_file_is_ignored_and_replaced(isa_file, content):
    isa_file.write_text(content.replace("KEY", inductor_setup.entry_key(ISA, "code")))
    probe = Probe()
    assert inductor_setup.remembered_check(ISA, "code", probe) is True and probe.calls == 1
    assert json.loads(isa_file.read_text()) == {"format": 1, "ok": [inductor_setup.entry_key(ISA, "code")]}


def test_no_key_means_probing(isa_file, monkeypatch):
    def no_compiler(compiler):
        raise RuntimeError("no g++")

    inductor_setup.remembered_check(ISA, "code", Probe())
    monkeypatch.setattr(inductor_setup, "_machine", no_compiler)
    _fresh_process()
    probe = Probe(ok=False)
    assert inductor_setup.remembered_check(ISA, "code", probe) is False and probe.calls == 1


def _forget_inductor_selection():
    """Inductor's selection as a new process starts it: its caches and the flags its probes set on the ISAs."""
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    for fn in (cpu_vec_isa.VecISA._VecISA__bool__impl, cpu_vec_isa.VecAVX512.__bool__,
               cpu_vec_isa.VecAVX512VNNI.__bool__, cpu_vec_isa.VecAMX.__bool__,
               cpu_vec_isa.VecAVX512.is_avx512_bf16_supported, cpu_vec_isa.VecAMX.is_amx_fp16_supported):
        fn.cache_clear()
    for isa in cpu_vec_isa.supported_vec_isa_list:
        for name in ("_is_avx512_bf16_supported", "_is_amx_fp16_supported"):
            isa.__dict__.pop(name, None)


def _selection():
    isa = cpu_vec_isa.pick_vec_isa()
    return str(isa), isa.build_arch_flags()


def test_inductors_selection_from_the_file_is_the_probed_one(isa_file, monkeypatch):
    """Real probes (g++ and a child Python per ISA) once; then, as in a new process, the file answers every
    probe inductor's selection asks (the real probe is replaced by one that fails the test)."""
    inductor_setup.uninstall()
    _forget_inductor_selection()
    try:
        inductor_setup.install()
        probed = _selection()
        inductor_setup.uninstall()
        _forget_inductor_selection()

        def no_probe(self, code):
            raise AssertionError(f"probed {self} although the file has the answer")

        monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", no_probe)
        inductor_setup.install()
        assert _selection() == probed
    finally:
        inductor_setup.uninstall()
        monkeypatch.undo()
        _forget_inductor_selection()
        inductor_setup.install()


def test_a_compiled_solve_after_the_setup_equals_the_sequential_loop(isa_file):
    L, w = 40, 4
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(L, w, w, generator=g, dtype=torch.float64) / w ** 0.5, torch.randn(L, w, generator=g,
                                                                                           dtype=torch.float64)
    x = torch.randn(2, w, generator=g, dtype=torch.float64)

    def step(z, W, b):
        return torch.tanh(torch.nn.functional.linear(z, W, b))

    inductor_setup.uninstall()
    res = deeppcr.solve(step, x, per_step=(W, b), jacobian="full", backend="inductor")
    assert res.stats.backend == "inductor", res.stats.backend_error
    assert inductor_setup._PATCHED  # the compile installed the remembered probe
    z, want = x, []
    for l in range(L):
        z = step(z, W[l], b[l])
        want.append(z)
    torch.testing.assert_close(res.states, torch.stack(want), rtol=1e-9, atol=1e-9)
