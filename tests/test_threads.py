"""Threads: tracing must not touch other threads' module calls, and one compiled module serves many threads.

torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` process-wide while it traces; before the
patches were made thread-aware, a module called from another thread during a first call recorded
itself into the trace (or read a Parameter as a Proxy) and crashed.
"""
import threading

import torch
import torch.nn as nn

import deeppcr_fx as deeppcr


def _mlp(depth: int, width: int = 4) -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])


def test_other_threads_call_their_modules_while_a_model_is_traced():
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    x_small = torch.randn(3, 4)
    expected = small(x_small).detach()
    big = _mlp(600)
    done, calls, errors = threading.Event(), [0], []

    def worker():
        while not done.is_set():
            try:
                with torch.no_grad():
                    out = small(x_small)
                assert isinstance(out, torch.Tensor) and type(small[0].weight) is nn.Parameter
                torch.testing.assert_close(out, expected)
                calls[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure in the other thread is the finding
                errors.append(exc)
                return

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        compiled = deeppcr.compile(big, policy="always")
        y = compiled(torch.randn(2, 4))
    finally:
        done.set()
        thread.join()
    assert errors == [] and calls[0] > 0
    assert compiled.report.rewritten and y.shape == (2, 4)


def test_two_threads_share_one_compiled_module():
    torch.manual_seed(0)
    model = _mlp(32)
    compiled = deeppcr.compile(model, policy="always")
    inputs = {b: [torch.randn(b, 4) for _ in range(6)] for b in (1, 3)}
    with torch.no_grad():
        expected = {b: [model(x) for x in xs] for b, xs in inputs.items()}
    results, errors = {}, []

    def worker(name, batch):
        try:
            with torch.no_grad():
                results[name] = [compiled(x) for x in inputs[batch]]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"t{i}", b)) for i, b in enumerate((1, 3, 1, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, b in enumerate((1, 3, 1, 3)):
        for got, want in zip(results[f"t{i}"], expected[b]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled.specialisations == 2 and all(r.rewritten for r in [compiled.report])
