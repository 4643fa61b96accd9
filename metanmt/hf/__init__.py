"""metanmt inside a ``transformers`` pipeline: ``MetaSeq2SeqTrainer`` is a drop-in for
``Seq2SeqTrainer`` whose optimizer steps are the engine's meta-steps (see :mod:`metanmt.hf.trainer`).

This is the top layer, beside the CLI: it imports the engine and nothing imports it.
"""

from .episodes import DatasetError, DatasetTasks
from .trainer import MetaArgumentsError, MetaSeq2SeqTrainer, MetaSeq2SeqTrainingArguments

__all__ = ["DatasetError", "DatasetTasks", "MetaArgumentsError", "MetaSeq2SeqTrainer", "MetaSeq2SeqTrainingArguments"]
