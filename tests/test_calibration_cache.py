"""The calibration cache: who owns it, its reset, thread safety, and the device fallback."""
import dataclasses
import logging
import threading
import time

import pytest
import torch

from deeppcr_fx.passes import calibrate as cal

CONSTANTS = cal.DeviceConstants(
    device="cpu", threads=1, t_op=3e-6, t_module=2e-6, t_autograd=1e-5, t_stack=2e-7, bandwidth=1.6e10,
    batched={k: (1e-4, ((4, 1e-9), (16, 1e-9))) for k in cal.BATCHED_KINDS},
    matmul=tuple((n, 1e-8) for n in cal.SIZES), matvec=tuple((n, 1e-9) for n in cal.SIZES))


@pytest.fixture
def fake_measure(monkeypatch):
    """A fresh process cache and a measurement that only counts its calls (slowly, to overlap threads)."""
    calls = []

    def fake(device):
        calls.append(device)
        time.sleep(0.05)
        return dataclasses.replace(CONSTANTS, device=str(device))

    monkeypatch.setattr(cal, "CACHE", cal.CalibrationCache())
    monkeypatch.setattr(cal, "measure", fake)
    return calls


def test_clear_makes_the_next_calibration_measure_again(fake_measure):
    first = cal.calibrate("cpu")
    assert cal.calibrate("cpu") is first and len(cal.CACHE) == 1
    cal.clear()
    assert len(cal.CACHE) == 0 and cal.cached() == {}
    assert cal.calibrate("cpu") is not first and len(fake_measure) == 2


def test_threads_calibrating_at_once_measure_once(fake_measure):
    results = []
    threads = [threading.Thread(target=lambda: results.append(cal.calibrate("cpu"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_measure) == 1 and len(results) == 4 and all(r is results[0] for r in results)


def test_a_cache_of_its_own_uses_its_own_measurement(fake_measure):
    own = cal.CalibrationCache(lambda device: dataclasses.replace(CONSTANTS, device="own"))
    assert own.get(torch.device("cpu")).device == "own" and len(own) == 1
    assert fake_measure == [] and len(cal.CACHE) == 0  # the process cache is untouched


def test_a_device_that_cannot_be_calibrated_falls_back_to_the_cpu(monkeypatch, caplog):
    def measure(device):
        if device.type != "cpu":
            raise AssertionError("Torch not compiled with CUDA enabled")  # what torch raises on a CPU-only build
        return CONSTANTS

    monkeypatch.setattr(cal, "CACHE", cal.CalibrationCache())
    monkeypatch.setattr(cal, "measure", measure)
    with caplog.at_level(logging.WARNING, logger="deeppcr_fx.passes.calibrate"):
        assert cal.constants_for("cuda", 0) is CONSTANTS
    assert "cannot calibrate cuda:0" in caplog.text and "AssertionError" in caplog.text


def test_a_bug_in_the_measurement_is_not_hidden(monkeypatch):
    def measure(device):
        raise KeyError("a bug, not a device the benchmark cannot drive")

    monkeypatch.setattr(cal, "CACHE", cal.CalibrationCache())
    monkeypatch.setattr(cal, "measure", measure)
    with pytest.raises(KeyError):
        cal.constants_for("cpu")
