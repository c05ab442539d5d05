"""The command line: ``python -m deeppcr_fx {demo,explain,bench}`` (also installed as ``deeppcr``)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Optional, Sequence

DTYPES = ("float32", "float64", "bfloat16", "float16")


class UsageError(Exception):
    """A bad argument: reported as one line, exit code 2."""


def _parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a comma-separated list of integers (e.g. 1,16)") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} must list positive sizes (e.g. 1,16)")
    return shape


def _load_factory(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{spec!r} is not MODULE:FACTORY (e.g. mypkg.models:build)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r}")
    return factory


def _explain(args: argparse.Namespace) -> int:
    import torch

    import deeppcr_fx as deeppcr

    from .inspect.drawing import check_drawable

    shape = _parse_shape(args.input_shape)
    if args.draw:
        try:  # fail before the work: an unknown suffix, pydot or Graphviz missing
            check_drawable(args.draw)
        except (ValueError, ImportError) as exc:
            raise UsageError(f"--draw: {exc}") from None
    factory = _load_factory(args.target)
    try:
        model = factory()
    except Exception as exc:  # the user's factory failed: one line, no traceback
        raise UsageError(f"{args.target}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{args.target}() returned a {type(model).__name__}, not a torch.nn.Module")
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    options = {"policy": args.policy} if args.policy else {}
    report = deeppcr.explain(model, (x,), **options)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    if args.draw:
        try:
            deeppcr.draw(report, args.draw)
        except (ValueError, ImportError, OSError) as exc:
            raise UsageError(f"--draw: {exc}") from None
        print(f"graph before/after written to {args.draw}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import main

    return main(quick=args.quick, threads=args.threads)


def _bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/suite.py`` (or, with ``--backward``, ``benchmarks/backward_vs_autograd.py``)."""
    import runpy
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / ("backward_vs_autograd.py" if args.backward else "suite.py")
    if not script.exists():
        raise UsageError("the benchmarks live in the source checkout (benchmarks/): run from a clone of the "
                         "repository installed with pip install -e .")
    if args.backward:
        argv = ["--device", args.device] + (["--repeats", "3"] if args.quick else [])
    else:
        argv = ["--suite", args.suite, "--device", args.device] + (["--quick"] if args.quick else [])
        argv += ["--threads", str(args.threads)] if args.threads else []
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device here")
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # the script's own exit code
        return int(exc.code or 0)
    finally:
        sys.argv = saved
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deeppcr", description="deeppcr_fx: parallel deep and step-by-step "
                                     "PyTorch computations (DeepPCR as a torch.fx pass).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile a built-in deep MLP and a DDIM sampler, check and time them")
    demo.add_argument("--quick", action="store_true", help="smaller models (a few seconds)")
    demo.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1)")
    demo.set_defaults(func=_demo)

    explain = sub.add_parser("explain", help="print what deeppcr.compile finds in a model")
    explain.add_argument("target", metavar="MODULE:FACTORY", help="a function that returns the nn.Module")
    explain.add_argument("--input-shape", required=True, help="the example input's shape, e.g. 1,16")
    explain.add_argument("--dtype", default="float32", choices=DTYPES)
    explain.add_argument("--policy", choices=("auto", "always", "never"), default=None)
    explain.add_argument("--json", action="store_true", help="print the report as JSON")
    explain.add_argument("--draw", metavar="OUT.svg", default=None,
                         help="also draw the graph before/after (.svg/.png/.pdf need pydot and Graphviz, .dot pydot)")
    explain.set_defaults(func=_explain)

    bench = sub.add_parser("bench", help="measure eager sequential models against deeppcr.compile "
                                         "(writes CSV/PNG under benchmarks/results/)")
    bench.add_argument("--suite", choices=("paper", "resnet", "diffusion", "all"), default="paper")
    bench.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    bench.add_argument("--quick", action="store_true", help="a small grid (a few minutes on a CPU)")
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on cpu)")
    bench.add_argument("--backward", action="store_true",
                       help="instead: the runtime's backward vs autograd of the sequential model (L=4096, w=4)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"deeppcr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
