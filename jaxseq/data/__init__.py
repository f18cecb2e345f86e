"""Data: vocabularies, token and real-valued streams for truncated BPTT, padded batches,
downloads."""

from jaxseq.data.download import (
    download,
)
from jaxseq.data.padded import (
    PaddedBatcher,
    pad_sequences,
)
from jaxseq.data.series import (
    SeriesBatcher,
    SeriesChunk,
)
from jaxseq.data.streams import (
    Chunk,
    StreamBatcher,
    make_streams,
)
from jaxseq.data.text import (
    CharVocab,
    split_text,
)

__all__ = [
    "CharVocab",
    "Chunk",
    "PaddedBatcher",
    "SeriesBatcher",
    "SeriesChunk",
    "StreamBatcher",
    "download",
    "make_streams",
    "pad_sequences",
    "split_text",
]
