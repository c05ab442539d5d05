"""Hugging Face transformers compiled as users call them: what is found, how exact, how fast.

For GPT-2, GPT-2 with its LM head, Llama and BERT (tiny random configs built locally, no downloads),
called with token ids (positionally) and with a padding mask (by keyword), it prints one row per case:
the front end ``auto`` chose, chains found / rewritten, L, period, state kind, Jacobian mode, whether
every solve evaluated its steps truly batched (``SolveStats.vectorized``), median Newton iterations per solve (float32, the timed calls), the largest difference
from eager over every output tensor (KV cache included) and parameter gradient, and the time of a
call vs eager with fresh token ids per call (forward without grad, and forward + backward; medians,
methods interleaved; wall time, and the speed-up in process CPU time, steadier on a shared machine).
``--per-sample-attention`` adds, interleaved with the two, the same compiled model with the chain's
attention left as eager's call, which vmap evaluates once per step and sample on CPU (what every
compiled transformer did before ``runtime/attention.py``): a before/after under one load.

    python benchmarks/zoo_transformers.py [--layers 16] [--width 32] [--seq 16] [--batch 4] [--repeats 15]
                                          [--backend auto] [--per-sample-attention]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
from torch.utils._pytree import tree_flatten

import deeppcr_fx as deeppcr


def models(layers: int, width: int, vocab: int = 100) -> dict:
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    gpt2 = dict(n_layer=layers, n_embd=width, n_head=2, n_positions=128, **common)
    llama = dict(num_hidden_layers=layers, hidden_size=width, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=2 * width, max_position_embeddings=128, pad_token_id=0, **common)
    bert = dict(num_hidden_layers=layers, hidden_size=width, num_attention_heads=2, intermediate_size=2 * width,
                max_position_embeddings=128, vocab_size=vocab, pad_token_id=0)
    return {"GPT2Model": lambda: tf.GPT2Model(tf.GPT2Config(**gpt2)),
            "GPT2LMHeadModel": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**gpt2)),
            "LlamaModel": lambda: tf.LlamaModel(tf.LlamaConfig(**llama)),
            "BertModel": lambda: tf.BertModel(tf.BertConfig(**bert))}


def tensors(output) -> list:
    found = []
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif hasattr(leaf, "layers"):  # a transformers Cache
            found += [t for layer in leaf.layers for t in (layer.keys, layer.values)]
    return found


def call(model, ids, keywords: bool):
    if not keywords:
        return model(ids)
    mask = torch.ones_like(ids)
    mask[0, : ids.shape[1] // 4] = 0  # left padding
    return model(input_ids=ids, attention_mask=mask)


def max_error(model, compiled, ids, keywords: bool) -> float:
    ref, out = tensors(call(model, ids, keywords)), tensors(call(compiled, ids, keywords))
    err = max((a - b).abs().max().item() for a, b in zip(out, ref))
    weights = [torch.randn_like(t) for t in ref]
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, weights)), params, allow_unused=True)
    g_out = torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, weights)), params, allow_unused=True)
    return max([err] + [(a - b).abs().max().item() for a, b in zip(g_out, g_ref) if b is not None])


def timed(fn, make_ids, repeats: int, backward: bool) -> list:
    """(wall, process CPU) seconds per call: on a shared machine the CPU time is the steadier of the two."""
    times = []
    for _ in range(repeats):
        ids = make_ids()
        start, cpu = time.perf_counter(), time.process_time()
        if backward:
            sum(t.sum() for t in tensors(fn(ids)) if t.requires_grad).backward()
        else:
            with torch.no_grad():
                fn(ids)
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times


@contextlib.contextmanager
def per_sample_attention():
    """Step templates built meanwhile keep eager's scaled_dot_product_attention (the former behaviour)."""
    import torch.nn.functional as F

    from deeppcr_fx.passes.decompose import DECOMPOSITIONS

    batched = DECOMPOSITIONS.pop(F.scaled_dot_product_attention)
    try:
        yield
    finally:
        DECOMPOSITIONS[F.scaled_dot_product_attention] = batched


def row(name: str, make, keywords: bool, args) -> str:
    torch.manual_seed(0)
    model64 = make().double().eval()
    compiled64 = deeppcr.compile(model64, policy="always")
    make_ids = lambda: torch.randint(1, 100, (args.batch, args.seq))  # noqa: E731
    call(compiled64, make_ids(), keywords)
    report = compiled64.report
    err = max_error(model64, compiled64, make_ids(), keywords)
    chains = report.rewritten
    kind = ",".join("tuple" if c.state.startswith("(") else "tensor" for c in chains) or "-"
    refused = "; ".join(f"L={c.length} {c.reason.value}" for c in report.refused) or "-"
    torch.manual_seed(0)
    model = make().eval()
    compiled = deeppcr.compile(model, policy="always", backend=args.backend)
    fns = {"eager": lambda ids: call(model, ids, keywords), "compiled": lambda ids: call(compiled, ids, keywords)}
    if args.per_sample_attention:
        before = deeppcr.compile(model, policy="always", backend=args.backend)
        with per_sample_attention():
            call(before, make_ids(), keywords)  # specialised (step template built) without the batched attention
        fns["per-sample"] = lambda ids: call(before, ids, keywords)
    ratios = []
    for backward in (False, True):
        for fn in fns.values():  # specialise and warm up
            timed(fn, make_ids, 2, backward)
        runs = {k: [] for k in fns}
        for _ in range(args.repeats):  # interleaved
            for k, fn in fns.items():
                runs[k] += timed(fn, make_ids, 1, backward)
        (eager, eager_cpu), (comp, comp_cpu) = ([statistics.median(t[i] for t in runs[k]) for i in (0, 1)]
                                                for k in ("eager", "compiled"))
        ratios.append(f"{comp * 1e3:.1f}/{eager * 1e3:.1f} ms ({eager / comp:.2f}x; CPU {eager_cpu / comp_cpu:.2f}x)")
        if args.per_sample_attention:
            old, old_cpu = (statistics.median(t[i] for t in runs["per-sample"]) for i in (0, 1))
            ratios[-1] += f" [per-sample attention {old * 1e3:.1f} ms, {eager / old:.2f}x; CPU {eager_cpu / old_cpu:.2f}x]"
    form = "keywords+mask" if keywords else "token ids"
    lengths = ",".join(str(c.length) for c in chains) or "-"
    periods = ",".join(str(c.period) for c in chains) or "-"
    stats = compiled.stats()
    iterations = statistics.median([i for s in stats for i in s.iterations]) if stats else "-"
    modes = ",".join(c.jacobian for c in chains) or "-"
    solves = [s for chain in stats for s in chain.solves]
    batched = ("yes" if all(s.vectorized for s in solves) else "no") if solves else "-"
    return (f"| {name} | {form} | {report.front_end} | {len(report.chains)}/{len(chains)} | {lengths} | {periods} | "
            f"{kind} | {modes} | {batched} | {iterations} | {err:.1e} | {ratios[0]} | {ratios[1]} | {refused} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--backend", default="auto", help="Config.backend of the timed compiled models")
    parser.add_argument("--per-sample-attention", action="store_true",
                        help="also time the compiled model with eager's (per-sample under vmap) attention")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}, backend {args.backend}, "
          f"L={args.layers}, width {args.width}, batch {args.batch}, seq {args.seq}; error: float64 outputs and "
          "gradients; time: float32, compiled/eager medians (eager/compiled speed-up)")
    print("| model | call | front end | chains found/rewritten | L | period | state | jacobian | batched | "
          "Newton iterations | max error | forward (no grad) | forward+backward | refused |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, make in models(args.layers, args.width).items():
        if args.only and name not in args.only.split(","):
            continue
        for keywords in (False, True):
            print(row(name, make, keywords, args), flush=True)


if __name__ == "__main__":
    main()
