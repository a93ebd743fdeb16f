"""A tiny pipeline on resilpool (the chaos-testing sample)."""

from .pipeline import run_pipeline, score

__all__ = ["run_pipeline", "score"]
