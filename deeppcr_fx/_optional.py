"""Optional dependencies (drawing, plotting, progress bars), imported on use with an install hint."""
from __future__ import annotations

import importlib
from types import ModuleType

from .results import MissingDependency


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ``MissingDependency`` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingDependency(f"{purpose} needs the optional package {top!r}: pip install {top} "
                                f"(or pip install 'deeppcr_fx[{extra}]')") from None
