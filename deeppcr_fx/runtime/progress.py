"""A tqdm progress bar for one solve (``Config.progress``), fed by the Newton loop's ``on_iteration``."""
from __future__ import annotations

from .._optional import require


class SolveProgress:
    """``bar(iteration, final_steps, worst_residual)``: advances to the steps that are final."""

    def __init__(self, length: int, description: str) -> None:
        tqdm = require("tqdm.auto", "progress", "Config.progress=True").tqdm
        self.bar = tqdm(total=length, desc=f"deeppcr {description}", unit="step", leave=False)

    def __call__(self, iteration: int, final_steps: int, residual: float) -> None:
        self.bar.update(final_steps - self.bar.n)
        self.bar.set_postfix(iteration=iteration, residual=f"{residual:.2g}", refresh=False)

    def close(self) -> None:
        self.bar.close()
