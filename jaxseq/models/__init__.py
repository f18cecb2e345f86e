"""Models composed from the layers: language models (recurrent, Transformer, fixed-window),
taggers and classifiers, seq2seq, and the xLSTM stack (mLSTM and sLSTM layers)."""

from jaxseq.models.language import (
    CELLS,
    LMParams,
    RecurrentLM,
    char_lm,
)
from jaxseq.models.seq2seq import (
    DecoderCarry,
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
from jaxseq.models.transformer import (
    KVCache,
    TransformerLM,
    TransformerLMParams,
    transformer_lm,
)
from jaxseq.models.window import (
    WindowLM,
    WindowLMParams,
    window_lm,
)
from jaxseq.models.xlstm import xlstm_stack

__all__ = [
    "CELLS",
    "DecoderCarry",
    "Encoded",
    "KVCache",
    "LMParams",
    "RecurrentLM",
    "Seq2SeqAttention",
    "Seq2SeqParams",
    "SequenceClassifier",
    "SequenceParams",
    "SequenceTagger",
    "TransformerLM",
    "TransformerLMParams",
    "WindowLM",
    "WindowLMParams",
    "char_lm",
    "classifier",
    "tagger",
    "transformer_lm",
    "window_lm",
    "xlstm_stack",
]
