"""Models composed from the layers: language models, taggers and classifiers, seq2seq."""

from jaxseq.models.language import (
    CELLS,
    LanguageModel,
    LMParams,
    char_lm,
)
from jaxseq.models.seq2seq import (
    Encoded,
    Seq2SeqAttention,
    Seq2SeqParams,
)
from jaxseq.models.sequence import (
    SequenceClassifier,
    SequenceParams,
    SequenceTagger,
    classifier,
    tagger,
)

__all__ = [
    "CELLS",
    "Encoded",
    "LMParams",
    "LanguageModel",
    "Seq2SeqAttention",
    "Seq2SeqParams",
    "SequenceClassifier",
    "SequenceParams",
    "SequenceTagger",
    "char_lm",
    "classifier",
    "tagger",
]
