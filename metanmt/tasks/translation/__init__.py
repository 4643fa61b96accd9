"""Translation tasks (MetaNMT, Gu et al. 2018): each source language X -> English is one task.

The package, one home per concern (lower modules never import higher ones):

- ``config``: the task suite's and the model's keys (the schema);
- ``corpora``: reading a suite's files by pattern;
- ``batching``: encoding, collation, token-sized batches of an epoch;
- ``model``: building, preparing, saving and loading the model; its forward pass and loss;
- ``decoding``: translation through ``generate``;
- ``scoring``: sacreBLEU;
- ``training``: the one fine-tuning loop;
- ``pretrained``: multilingual checkpoints (source-language codes, the forced English target, frozen positions);
- ``family``: :class:`TranslationFamily`, the task family the engine trains (episodes, loss, validation).

One shared ``transformers`` seq2seq model (Marian-style from the config, or any
``AutoModelForSeq2SeqLM`` checkpoint) and one shared SentencePiece vocabulary serve every language.
An episode is one language: a support batch and a disjoint query batch drawn from its pairs, both
sized in target tokens as in MetaNMT::

    family = TranslationFamily(
        task_cfg={"source": "cldr", "train_languages": ["de", "fr"], "dev_languages": ["ro"], "vocab_size": 2000},
        model_cfg={"d_model": 64, "encoder_layers": 1, "decoder_layers": 1},
    )
    model = family.build_model()            # trains (or reuses from the cache) the shared vocabulary
    episode = family.sample_episode(np.random.default_rng([0, 0, 0]), split="train")
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    loss = family.loss(model, params, episode.support)       # token-mean cross-entropy
    family.save_model(model, Path("runs/x"))                 # AutoModelForSeq2SeqLM / AutoTokenizer load it

Where the vocabulary comes from, in order: ``task.vocab`` (a folder holding a saved tokenizer, e.g.
an earlier run), the ``pretrained`` checkpoint's own tokenizer, a tokenizer adopted with
:meth:`TranslationFamily.use_tokenizer` or :meth:`TranslationFamily.load_model` (a run folder),
else one trained on the training languages (both sides) the first time it is needed and cached
on disk by a hash of that text (``$METANMT_CACHE``, default ``~/.cache/metanmt``), so resuming a
run or starting another on the same data gets the identical vocabulary without training again.
The token counts that order each language's pairs for episodes are cached beside it, so a
study's later training processes do not encode the whole pool again (``task.vocab_cache: false``
turns both caches off).

Adaptation patterns (fnmatch over ``model.named_parameters()`` names, and module roles
``@embeddings``, ``@encoder``, ``@decoder``, ``@lm_head`` found from the model's structure,
:mod:`metanmt.tasks.roles`): ``["*"]`` adapts everything (the default); MetaNMT's embeddings +
encoder is ``["@embeddings", "@encoder"]`` (in a Marian model ``["model.shared.*", "model.encoder.*"]``).
With tied embeddings (the default) ``model.shared.weight`` is also the decoder's input embedding and
the output projection, and it appears once, under that name. The sinusoidal position tables
(Marian's ``model.*.embed_positions.weight``, M2M100/NLLB's ``weights`` buffers) are frozen and never
adapted. Multilingual checkpoints (mBART-50, M2M100, NLLB, T5) get each episode's source language
as their code or prefix and translate into English (:mod:`.pretrained`).
"""

from .batching import IGNORE
from .config import SPLITS, TranslationModelConfig, TranslationTaskConfig
from .family import TranslationFamily

__all__ = ["IGNORE", "SPLITS", "TranslationFamily", "TranslationModelConfig", "TranslationTaskConfig"]
