"""Algorithms: each turns one task's episode into its contribution to the outer update.

The outer loop (``engine/trainer.py``) averages the contributions of a meta-batch's tasks across
processes and hands the average to the outer optimizer as the gradient of the initialization.
"""

from .base import Algorithm, TaskResult

__all__ = ["Algorithm", "TaskResult"]
