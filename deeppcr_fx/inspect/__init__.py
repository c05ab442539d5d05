"""Inspection: compile reports as data, rendered separately."""
from .report import ChainRecord, CompileReport

__all__ = ["ChainRecord", "CompileReport"]
