"""The examples (examples/*.py) in their ``--smoke`` mode, in this process, so they never rot.

Each example's ``main(argv)`` returns 0 only when its own correctness checks pass (compiled outputs,
gradients and loss curves against the plain models); these tests also check the printed summary
and the PNG. The demo (``python -m deeppcr_fx demo``) runs in tests/test_cli.py.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_example(tmp_path, capsys):
    """Run ``examples/<name>.py --smoke`` via its main(); restore the thread count it sets."""
    threads = torch.get_num_threads()

    def run(name: str, *args: str):
        png = tmp_path / f"{name}.png"
        rc = _load(name).main(["--smoke", "--png", str(png), *args])
        out = capsys.readouterr().out
        return rc, out, png

    yield run
    torch.set_num_threads(threads)


def _check_png(png: Path, out: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed: skipping the PNG" in out and not png.exists()
    else:
        assert png.exists() and png.stat().st_size > 10_000 and f"wrote {png}" in out


def test_mlp_speed_smoke(run_example):
    rc, out, png = run_example("mlp_speed")
    assert rc == 0, out
    assert "1 intra-op thread(s)" in out and "[smoke mode]" in out
    assert "fwd speed-up" in out and "bwd speed-up" in out and "all OK" in out
    _check_png(png, out)


def test_mlp_speed_solve_method(run_example):
    rc, out, _ = run_example("mlp_speed", "--method", "solve", "--depths", "32", "--png", "none")
    assert rc == 0, out
    assert " solve " in out and "note: method 'solve'" in out


def test_train_deep_resnet_smoke(run_example):
    pytest.importorskip("sklearn")
    rc, out, png = run_example("train_deep_resnet")
    assert rc == 0, out
    assert "loss curves agree" in out and "deeppcr.compile" in out and "test acc" in out
    assert "1 rewritten" in out
    _check_png(png, out)


def test_diffusion_sampling_smoke(run_example):
    pytest.importorskip("sklearn")
    pytest.importorskip("diffusers")
    rc, out, png = run_example("diffusion_sampling")
    assert rc == 0, out
    assert "DDPM 20" in out and "DDIM 10" in out and "converged" in out
    assert "residual / tolerance per Newton iteration" in out
    _check_png(png, out)


def test_missing_matplotlib_is_one_line(monkeypatch, capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _common
    finally:
        sys.path.remove(str(EXAMPLES))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert _common.pyplot() is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "matplotlib is not installed: skipping the PNG" in out
