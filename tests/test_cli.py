"""The command line end to end, in subprocesses: demo, explain, and its error cases."""
import json
import subprocess
import sys

import pytest


def _run(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "deeppcr_fx", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_quick_runs_and_checks_outputs():
    proc = _run("demo", "--quick")
    assert proc.returncode == 0, proc.stderr
    assert "rewritten" in proc.stdout and "summary" in proc.stdout
    assert "max |y - y_plain|" in proc.stdout


def test_explain_prints_report_and_json():
    proc = _run("explain", "deeppcr_fx.demo:deep_mlp", "--input-shape", "2,4")
    assert proc.returncode == 0, proc.stderr
    assert "deeppcr compile report: Sequential" in proc.stdout
    proc = _run("explain", "deeppcr_fx.demo:deep_mlp", "--input-shape", "2,4", "--json", "--dtype", "float64")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["chains"][0]["length"] == 64 and data["chains"][0]["dtype"] == "float64"


@pytest.mark.parametrize("args,message", [
    (("explain", "no_such_module_xyz:f", "--input-shape", "1,4"), "cannot import module 'no_such_module_xyz'"),
    (("explain", "deeppcr_fx.demo:nope", "--input-shape", "1,4"), "has no attribute 'nope'"),
    (("explain", "deeppcr_fx.demo", "--input-shape", "1,4"), "is not MODULE:FACTORY"),
    (("explain", "deeppcr_fx.demo:deep_mlp", "--input-shape", "1,x"), "not a comma-separated list of integers"),
    (("explain", "deeppcr_fx.demo:deep_mlp", "--input-shape", "0,4"), "must list positive sizes"),
    (("explain", "json:dumps", "--input-shape", "1,4"), "raised TypeError"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [(), ("demo",), ("explain",), ("bench",)])
def test_help(command):
    proc = _run(*command, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout


TESTS = str(__import__("pathlib").Path(__file__).parent)


def _run_env(*args, pythonpath=(TESTS,), timeout=240):
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*pythonpath, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "deeppcr_fx", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_explain_three_chains_json_round_trips_and_draws(tmp_path):
    pytest.importorskip("pydot")
    out = tmp_path / "graph.dot"
    proc = _run_env("explain", "inspect_models:three_chains", "--input-shape", "2,8", "--policy", "always",
                    "--json", "--draw", str(out))
    assert proc.returncode == 0, proc.stderr
    import deeppcr_fx as deeppcr

    report = deeppcr.CompileReport.from_dict(json.loads(proc.stdout))
    assert [(c.length, c.period, c.status) for c in report.chains] == [(9, 1, "rewritten"), (8, 1, "rewritten"),
                                                                       (10, 2, "rewritten")]
    assert "cluster_after" in out.read_text() and "written to" in proc.stderr


def test_explain_draw_without_pydot(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "pydot.py").write_text("raise ModuleNotFoundError('pydot hidden by the test', name='pydot')\n")
    proc = _run_env("explain", "inspect_models:three_chains", "--input-shape", "2,8", "--draw",
                    str(tmp_path / "g.svg"), pythonpath=(str(shim), TESTS))
    assert proc.returncode == 2
    assert "--draw: deeppcr.draw needs the optional package 'pydot': pip install pydot" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_explain_draw_bad_suffix(tmp_path):
    proc = _run_env("explain", "inspect_models:three_chains", "--input-shape", "2,8", "--draw",
                    str(tmp_path / "g.txt"))
    assert proc.returncode == 2 and "use one of .svg" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
