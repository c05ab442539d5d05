"""``deeppcr.compile(pipe)``: the one-liner for a diffusers pipeline (``deeppcr_fx/pipelines.py``)."""
import pytest
import torch

import deeppcr_fx as deeppcr
from deeppcr_fx.pipelines import CompiledPipeline

diffusers = pytest.importorskip("diffusers")
from test_zoo_diffusers import _pipelines  # noqa: E402


def test_compile_of_a_pipeline_compiles_its_loop():
    pipe = _pipelines()["ddim"]
    pipe.set_progress_bar_config(disable=True)
    compiled = deeppcr.compile(pipe, policy="always", min_length=4, jacobian="identity")
    assert isinstance(compiled, CompiledPipeline)
    got = compiled(generator=torch.Generator().manual_seed(5), num_inference_steps=4, output_type="pt").images
    want = pipe(generator=torch.Generator().manual_seed(5), num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert [r.length for r in compiled.report.rewritten] == [4]
