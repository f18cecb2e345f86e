"""A cached download checked by its sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request

__all__ = [
    "download",
]


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, sha256: str, cache_dir=None, filename: str | None = None, timeout=30.0):
    """Fetches ``url`` into ``cache_dir`` (default ``~/.cache/jaxseq``) once, checking its sha256.

    A cached file with the right checksum is reused. The file is written to a
    temporary name and renamed, so an interrupted download leaves nothing
    half-written. Raises ``RuntimeError`` with a readable message when there is
    no network or the checksum does not match.

    >>> import hashlib, os, pathlib, tempfile, jaxseq as js
    >>> tmp = tempfile.mkdtemp()
    >>> src = pathlib.Path(tmp, "corpus.txt")
    >>> _ = src.write_text("to be or not to be")
    >>> sha = hashlib.sha256(src.read_bytes()).hexdigest()
    >>> path = js.data.download(src.as_uri(), sha, cache_dir=os.path.join(tmp, "cache"))
    >>> open(path).read()
    'to be or not to be'
    """
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "jaxseq")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, filename or os.path.basename(url))
    if os.path.exists(path) and _sha256(path) == sha256:
        return path
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            while block := r.read(1 << 20):
                f.write(block)
        got = _sha256(tmp)
        if got != sha256:
            raise RuntimeError(
                f"download: checksum mismatch for {url}: expected {sha256}, got {got}"
            )
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise RuntimeError(f"download: could not fetch {url} ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
