"""The engine: the inner loop (inner.py), the algorithms (algorithms/), the task sampler
(sampler.py) and the outer loop (trainer.py)."""
