"""Task families: each knows its data, its model and its loss, and samples episodes."""

from .base import Episode, TaskFamily

__all__ = ["Episode", "TaskFamily"]
