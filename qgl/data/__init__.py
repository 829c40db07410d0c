"""Text data: offline tokenizers, cached token streams in fixed-length blocks, and (importing
Lightning only when asked for) `TextDataModule`."""

from qgl.data.dataset import (
    CORPUS_PATH,
    TokenBlocks,
    build_datasets,
    default_cache_dir,
    load_tokens,
    resolve_source,
)
from qgl.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer

__all__ = ["CORPUS_PATH", "ByteTokenizer", "HFTokenizer", "TextDataModule", "TokenBlocks", "Tokenizer",
           "build_datasets", "default_cache_dir", "get_tokenizer", "load_tokens", "resolve_source"]


def __getattr__(name: str):
    # Lazy, so that `qgl.data` (tokenizer, datasets) stays usable in a plain torch loop without Lightning.
    if name == "TextDataModule":
        from qgl.data.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module 'qgl.data' has no attribute {name!r}")
