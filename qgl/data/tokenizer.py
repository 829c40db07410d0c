"""Offline tokenizers: UTF-8 bytes (always available) or a Hugging Face tokenizer from a local path.

Both expose the same small interface (`Tokenizer`): `name` (goes into the token cache key),
`vocab_size`, `eos_id`, `encode(str) -> list[int]` and `decode(ids) -> str`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is end-of-text. Lossless for any text and
    needs no files, at the cost of ~4x longer sequences than a BPE vocabulary on English."""

    name = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # Special ids carry no bytes; a sequence cut inside a multi-byte character decodes to U+FFFD.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never from the hub). Needs `transformers`."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(
                f"loading the tokenizer at {str(path)!r} needs the optional package `transformers`: "
                "pip install 'qgl[hf]', or use tokenizer='byte'"
            ) from e
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self._tok.eos_token_id is None:
            raise ValueError(f"the tokenizer at {path!r} defines no eos token, needed between documents")
        self.eos_id = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)
        self.name = f"hf:{path}:{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


def get_tokenizer(spec: str | Tokenizer = "byte") -> Tokenizer:
    """"byte" -> `ByteTokenizer`; a local directory -> `HFTokenizer`; a tokenizer object is returned as is."""
    if not isinstance(spec, str):
        return spec
    if spec == "byte":
        return ByteTokenizer()
    if os.path.isdir(spec):
        return HFTokenizer(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith("."):
        return _hub_tokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: use 'byte', the path of a local Hugging Face "
                     "tokenizer directory, or a Hub id 'org/name' (fetched where the Hub is reachable)")


def _hub_tokenizer(repo_id: str) -> HFTokenizer:
    """The tokenizer of Hub repository `repo_id` ('org/name'), downloaded (and cached) by
    huggingface_hub; one line naming it where the Hub cannot provide it."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.model", "*.txt", "*.jinja",
                                                          "*.tiktoken"])
    except Exception as err:  # offline, unknown repo, gated: all end here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OSError(f"tokenizer {repo_id!r}: not a local directory, and the Hugging Face Hub could not "
                      f"provide it ({first})") from None
    return HFTokenizer(path)
