"""Text sources -> one token stream cached on disk -> fixed-length (input, label) blocks.

A source is one of
  * "corpus" (alias "embedded"): the embedded corpus (`corpus.txt.gz`, Jane Austen's six novels,
    see CORPUS.md);
  * a local .txt or .jsonl file, or a folder searched recursively for them (each .txt file is
    one document; each .jsonl line is a JSON object whose `text_field` is one document);
  * "hf:<dataset>[:<config>]": a Hugging Face dataset through the optional `datasets` package.

Documents are tokenized and joined with the tokenizer's eos id into one stream, stored as
np.uint16 (np.uint32 for vocabularies over 65536) in `<cache_dir>/<name>-<key>.bin` with a
`.json` beside it (source, fingerprint, tokenizer, dtype, number of tokens). The key hashes the
source's content fingerprint and the tokenizer, so a second run memory-maps the file instead of
tokenizing again, and a changed file gets a new cache entry. Both files are written to a temporary
name and moved into place with os.replace, the .json last: a crash never leaves a partial entry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from qgl._atomic import atomic_open
from qgl.data.tokenizer import Tokenizer, get_tokenizer

CORPUS_PATH = Path(__file__).with_name("corpus.txt.gz")
TEXT_SUFFIXES = (".txt", ".jsonl")
_PIECE_CHARS = 1 << 20  # text is tokenized in pieces of ~1M characters, cut after a newline
_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """`$QGL_CACHE` if set, else `~/.cache/qgl`."""
    return Path(os.environ.get("QGL_CACHE") or Path.home() / ".cache" / "qgl")


@dataclass(frozen=True)
class TextSource:
    """A resolved source: `documents()` yields its documents in a fixed order, each as an iterable
    of text pieces (a long file is read piece by piece, so that it never sits in memory whole)."""

    kind: str  # "corpus" | "local" | "hf"
    identity: str  # what the user asked for, normalised
    fingerprint: str  # changes whenever the content does
    documents: Callable[[], Iterator[Iterable[str]]]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.identity).name or self.kind)[:48]


class DataError(ValueError):
    """Unusable input data; `str(error)` is one line naming the file (and line) and the problem."""


def read_corpus() -> str:
    """The embedded corpus as one string (about 4 MB)."""
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8", newline="") as f:
        return f.read()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _text_pieces(path: Path) -> Iterator[str]:
    """A text file (.gz: compressed) in pieces of about _PIECE_CHARS characters, each ending at a
    line end. newline="" keeps the text exactly as stored."""
    opener = gzip.open if path.suffix == ".gz" else open
    piece: list[str] = []
    size = 0
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= _PIECE_CHARS:
                    yield "".join(piece)
                    piece, size = [], 0
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_first_bad_line(path, opener)}: not UTF-8 text ({e.reason})") from e
    if piece:
        yield "".join(piece)


def _first_bad_line(path: Path, opener: Callable) -> int | str:
    """The 1-based number of the first line of `path` that is not UTF-8 (read again, as bytes: only
    on the error path, so that reading stays in text mode and keeps its pieces as they were)."""
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return "?"


def _jsonl_documents(path: Path, text_field: str) -> Iterator[list[str]]:
    """Each line of a .jsonl file: a JSON object whose `text_field` is a string (blank lines skipped).
    Any other line is a `DataError` naming `path:line`."""
    with open(path, "rb") as f:  # bytes, so that a bad encoding is reported with its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line is "
                                f"0x{raw[e.start]:02x})") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict) or text_field not in row:
                raise DataError(f"{path}:{lineno}: no field {text_field!r} (set text_field to the "
                                "name of the text field)")
            text = row[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__} "
                                f"{json.dumps(text)[:40]}, expected a string")
            yield [text]


def _local_source(path: Path, text_field: str) -> TextSource:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"folder {str(path)!r} holds no {' or '.join(TEXT_SUFFIXES)} files")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{_file_sha256(f)}\0".encode())
    # text_field selects the content of .jsonl files, so it is part of the fingerprint.
    h.update(text_field.encode())

    def documents() -> Iterator[Iterable[str]]:
        for f in files:
            if f.suffix == ".jsonl":
                yield from _jsonl_documents(f, text_field)
            else:  # one document per text file
                yield _text_pieces(f)

    return TextSource("local", str(path), h.hexdigest(), documents)


def _hf_source(spec: str, text_field: str, split: str) -> TextSource:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"data source {spec!r} needs the optional package `datasets`: "
                          "pip install 'qgl[hf]', or use a local .txt/.jsonl source") from e
    name, _, config = spec[len("hf:"):].partition(":")
    ds = datasets.load_dataset(name, config or None, split=split)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {spec!r} has no column {text_field!r}; columns: {ds.column_names}")
    fingerprint = getattr(ds, "_fingerprint", None) or f"{name}/{config}/{split}"
    identity = f"{spec}:{split}:{text_field}"
    return TextSource("hf", identity, str(fingerprint), lambda: ([row[text_field]] for row in ds))


def resolve_source(source: str | os.PathLike = "corpus", *, text_field: str = "text",
                   hf_split: str = "train") -> TextSource:
    """Turn a source spec ("corpus", a path, or "hf:<dataset>[:<config>]") into a `TextSource`."""
    if source in ("corpus", "embedded", "", None):  # "embedded": the recipes' name for it
        fingerprint = _file_sha256(CORPUS_PATH)
        return TextSource("corpus", "corpus", fingerprint, lambda: iter([_text_pieces(CORPUS_PATH)]))
    if isinstance(source, str) and source.startswith("hf:"):
        return _hf_source(source, text_field, hf_split)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {str(source)!r} not found: expected 'corpus', "
                                "'hf:<dataset>[:<config>]', or an existing .txt/.jsonl file or folder")
    return _local_source(path.resolve(), text_field)


def _atomic_write_bytes(path: Path, chunks: Iterator[bytes]) -> int:
    """Write chunks atomically to `path` (see `qgl._atomic.atomic_open`); returns the byte count."""
    size = 0
    with atomic_open(path) as f:
        for chunk in chunks:
            f.write(chunk)
            size += len(chunk)
    return size


def _read_meta(meta_path: Path, bin_path: Path, key: str) -> dict | None:
    """The cache entry's metadata if the entry is complete and belongs to `key`, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
        if meta.get("key") == key and bin_path.stat().st_size == expected:
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def load_tokens(source: str | os.PathLike = "corpus", tokenizer: str | Tokenizer = "byte", *,
                cache_dir: str | os.PathLike | None = None, text_field: str = "text",
                hf_split: str = "train") -> np.memmap:
    """The whole token stream of `source`, 1-D np.uint16/np.uint32, memory-mapped read-only from the
    cache (tokenized and written there first if no matching entry exists)."""
    tok = get_tokenizer(tokenizer)
    src = resolve_source(source, text_field=text_field, hf_split=hf_split)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    meta = {"format": _FORMAT_VERSION, "source": src.identity, "kind": src.kind,
            "fingerprint": src.fingerprint, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": dtype.name}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    bin_path, meta_path = cache / f"{src.slug}-{key[:16]}.bin", cache / f"{src.slug}-{key[:16]}.json"

    found = _read_meta(meta_path, bin_path, key)
    if found is None:
        eos = np.asarray([tok.eos_id], dtype=dtype).tobytes()

        def chunks() -> Iterator[bytes]:
            for doc in src.documents():
                empty = True
                for piece in doc:
                    if piece:
                        empty = False
                        yield np.asarray(tok.encode(piece), dtype=dtype).tobytes()
                if not empty:  # one eos after each document, so that documents do not run together
                    yield eos

        num_tokens = _atomic_write_bytes(bin_path, chunks()) // dtype.itemsize
        if num_tokens == 0:
            bin_path.unlink()
            raise ValueError(f"data source {src.identity!r} holds no text")
        found = {**meta, "key": key, "num_tokens": num_tokens}
        _atomic_write_bytes(meta_path, iter([json.dumps(found, indent=2).encode()]))
    return np.memmap(bin_path, dtype=found["dtype"], mode="r", shape=(found["num_tokens"],))


class TokenBlocks(Dataset):
    """Non-overlapping blocks of a 1-D token stream (or of tokens[start:stop]).

    Item i is (input_ids, labels), each [block_size] torch.long, cut from the window
    tokens[start + i*block_size : start + (i+1)*block_size + 1]: labels are the inputs shifted by one.
    A memory-mapped stream is re-opened, not copied, when the dataset is pickled to DataLoader workers.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor, block_size: int, *, start: int = 0,
                 stop: int | None = None) -> None:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        self.tokens, self.block_size = tokens, block_size
        self.start, self.stop = start, len(tokens) if stop is None else stop
        if block_size < 1 or self.stop - self.start < block_size + 1:
            raise ValueError(f"{self.stop - self.start} tokens are too few for one block of "
                             f"block_size={block_size} (needs block_size + 1)")

    def __len__(self) -> int:
        return (self.stop - self.start - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks")
        a = self.start + (i % n) * self.block_size
        window = torch.from_numpy(np.asarray(self.tokens[a : a + self.block_size + 1], dtype=np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        t = self.tokens
        if isinstance(t, np.memmap) and t.filename is not None:
            state["tokens"] = ("memmap", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        t = state["tokens"]
        if isinstance(t, tuple) and t[0] == "memmap":
            state["tokens"] = np.memmap(t[1], dtype=t[2], mode="r", offset=t[3], shape=t[4])
        self.__dict__.update(state)


def build_datasets(source: str | os.PathLike = "corpus", block_size: int = 256, val_fraction: float = 0.01,
                   tokenizer: str | Tokenizer = "byte",
                   **load_kwargs) -> tuple[TokenBlocks, TokenBlocks | None]:
    """Train and validation blocks: the last `val_fraction` of the token stream is held out (a fixed
    split, so that validation never sees training text); no validation set when val_fraction is 0.
    `load_kwargs` go to `load_tokens` (cache_dir, text_field, hf_split)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    tokens = load_tokens(source, tokenizer, **load_kwargs)
    n_val = int(len(tokens) * val_fraction)
    if val_fraction > 0 and n_val < block_size + 1:
        raise ValueError(f"val_fraction={val_fraction} leaves {n_val} validation tokens, fewer than one "
                         f"block of {block_size} + 1; raise val_fraction or lower block_size")
    train = TokenBlocks(tokens, block_size, stop=len(tokens) - n_val)
    val = TokenBlocks(tokens, block_size, start=len(tokens) - n_val) if n_val else None
    return train, val
