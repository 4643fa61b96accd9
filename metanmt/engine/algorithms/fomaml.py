"""First-order MAML: the query-loss gradient at the adapted weights, applied to the initialization.

    algorithm: {name: fomaml, inner_steps: 3, inner_lr: 0.1, support_in_outer: true}

The same implementation as MAML with ``second_order = False`` (``maml.py``); this module keeps the
``metanmt.engine.algorithms.fomaml:FOMAML`` entry point.
"""

from .maml import FOMAML

__all__ = ["FOMAML"]
