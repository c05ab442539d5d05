"""Real Hugging Face models, called as people call them (token ids, keyword masks), compiled with the default
front end: each is found and rewritten as one chain of its layers, and its whole output (hidden states, the KV
cache, logits) and every parameter gradient equal eager's. Tiny random configs, built locally (no downloads)."""
import functools

import pytest
import torch
from torch.utils._pytree import tree_flatten

transformers = pytest.importorskip("transformers")

import deeppcr_fx as deeppcr  # noqa: E402

VOCAB, LAYERS, SEQ = 100, 8, 6


@functools.lru_cache(maxsize=None)  # built once per session (initialising weights is most of a build); never mutated
def _gpt2(head=False):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(config).double().eval()


def _llama():
    return transformers.LlamaModel(transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=16, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
        vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=LAYERS, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB,
        max_position_embeddings=32, pad_token_id=0))


def _tensors(output) -> list:
    """Every tensor of a model output, the KV cache's keys and values included."""
    found = []
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif hasattr(leaf, "layers"):  # a transformers Cache
            found += [t for layer in leaf.layers for t in (layer.keys, layer.values)]
    return found


def _check(model, compiled, call, rtol):
    """Fresh token ids: outputs and parameter gradients of ``compiled`` equal ``model``'s (relative to each
    tensor's magnitude)."""
    ids = torch.randint(1, VOCAB, (2, SEQ))
    ref, out = _tensors(call(model, ids)), _tensors(call(compiled, ids))
    assert len(ref) == len(out) > 0
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
    weights = [torch.randn_like(t) for t in ref]
    params = list(model.parameters())
    g_ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, weights)), params, allow_unused=True)
    g_out = torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, weights)), params, allow_unused=True)
    for a, b, (name, _) in zip(g_out, g_ref, model.named_parameters()):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=name)


def _positional(m, ids):
    return m(ids)


def _keywords(m, ids):
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return m(input_ids=ids, attention_mask=mask)


CASES = {  # name: (model, call, front end, chain period, covered modules, relative tolerance)
    # LlamaRMSNorm and the rotary embedding compute in float32 even in a float64 model: float32 round-off
    "gpt2": (_gpt2, _positional, "record", 2, ("h.0", "h.7"), 1e-9),
    "gpt2_lm_head": (lambda: _gpt2(head=True), _positional, "record", 2, ("transformer",), 1e-9),
    "llama": (_llama, _positional, "record", 2, ("layers.0", "layers.7"), 1e-6),
    "bert": (_bert, _positional, "record", 4, ("encoder",), 1e-9),
}


@pytest.mark.parametrize("name", CASES)
def test_found_rewritten_and_equal(name, capfd):
    make, call, front_end, period, covers, rtol = CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    compiled = deeppcr.compile(model, policy="always")
    assert compiled.config is model.config
    call(compiled, torch.randint(1, VOCAB, (2, SEQ)))  # specialise
    report = compiled.report
    assert report is not None and report.front_end == front_end, str(report)
    rewritten = report.rewritten
    assert [(c.length, c.period) for c in rewritten] == [(LAYERS, period)], str(report)
    assert rewritten[0].covers[0].endswith(covers[0]) and rewritten[0].covers[-1].endswith(covers[-1])
    for chain in report.refused:  # BERT's three embeddings added up look like a 2-step chain
        assert chain.length < 8 and chain.reason.value in ("shapes_differ", "too_short"), str(report)
    _check(model, compiled, call, rtol)
    assert compiled.stats()[-1].solves
    assert "Traceback" not in capfd.readouterr().err


def test_keyword_inputs_and_cache_through_dynamo(capfd):
    """GPT-2 with a padding mask: recording refuses (the masking code reads the mask's values), TorchDynamo
    captures; the report says both, and the KV cache handed back equals eager's."""
    torch.manual_seed(0)
    model = _gpt2()
    compiled = deeppcr.compile(model, policy="always")
    _keywords(compiled, torch.randint(1, VOCAB, (2, SEQ)))
    report = compiled.report
    assert report.front_end == "dynamo" and [(c.length, c.period) for c in report.rewritten] == [(LAYERS, 2)]
    notes = " ".join(report.notes)
    assert "data-dependent" in notes and "recomputed from the solved states" in notes
    _check(model, compiled, _keywords, 1e-9)
    assert "Traceback" not in capfd.readouterr().err


def test_hidden_states_and_options_by_keyword():
    """``output_hidden_states=True`` installs transformers' output-capturing hooks on the layers for good: they are
    inert outside such a call, and the hidden states they collect are outputs of the recorded graph, so the chain
    is rewritten with them (and, in the test above, without them); ``use_cache=False`` is a constant of its own
    specialisation."""
    torch.manual_seed(0)
    model = _gpt2()
    compiled = deeppcr.compile(model, policy="always")
    for options in (dict(output_hidden_states=True), dict(use_cache=False)):
        call = lambda m, ids: m(ids, **options)  # noqa: E731
        call(compiled, torch.randint(1, VOCAB, (2, SEQ)))
        assert [(c.length, c.period) for c in compiled.report.rewritten] == [(LAYERS, 2)], str(compiled.report)
        ids = torch.randint(1, VOCAB, (2, SEQ))
        got, want = _tensors(call(compiled, ids)), _tensors(call(model, ids))
        assert len(got) == len(want) == (3 * LAYERS + 2 if "output_hidden_states" in options else 1)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
