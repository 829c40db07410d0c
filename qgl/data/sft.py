"""Instruction / chat fine-tuning data: JSON lines -> (input_ids, labels) with loss on responses only.

Each line of a `.jsonl` file (also `.json`, `.jsonl.gz`, `.json.gz`: read as JSON lines; a folder:
every such file in it, sorted) is one example, either

    {"prompt": "...", "response": "..."}        prompt tokens, then response tokens + eos
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}

A `messages` example is rendered by the tokenizer's chat template (`apply_chat_template`); the text
of every assistant turn (what the template adds for it, from after the generation prompt of the turns
before it to the end of the turn) is trained, everything else (system, user, the template's markup)
is context. A `prompt`/`response` pair is joined as it stands (no template; put any formatting in the
prompt) and the response ends with the tokenizer's eos.

Labels follow qgl's convention (`qgl.models.LlamaForCausalLM`, `causal_lm_loss`): `labels[t]` is
the token that should follow `input_ids[t]`, or -100 where that token is context, so prompt tokens
carry no loss. Two layouts (`packing`):
  * packing (default): the examples are concatenated into one stream cut into blocks of
    `block_size` (+1 for the shifted labels); an example may span two blocks; no padding.
  * padding: one example per row, truncated to `block_size` + 1 tokens, padded with eos and -100.
Every problem names the file and the line.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from qgl.data.tokenizer import Tokenizer, get_tokenizer

IGNORE_INDEX = -100
SFT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def sft_files(source: str | os.PathLike) -> list[Path]:
    """The JSON-lines files of `source` (a file, or a folder searched recursively), sorted."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SFT_SUFFIXES))
        if files:
            return files
        raise ValueError(f"folder {str(path)!r} holds no {', '.join(SFT_SUFFIXES)} files")
    raise FileNotFoundError(f"fine-tuning data {str(path)!r} does not exist")


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of every non-blank line; `.gz` files are decompressed."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                     "fine-tuning data is one JSON object a line") from None
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: cannot read it as UTF-8 JSON lines ({e})") from None


def _hf(tokenizer: Tokenizer) -> Any:
    return getattr(tokenizer, "_tok", None)  # qgl.data.HFTokenizer wraps a transformers tokenizer


def encode_example(row: Any, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """(token ids, trained mask: True where the token is part of a response) of one example."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt'/'response' or 'messages', "
                         f"got {type(row).__name__}")
    if "messages" in row:
        return _encode_messages(row["messages"], tokenizer, where)
    if "prompt" in row and "response" in row:
        prompt, response = row["prompt"], row["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"{where}: 'prompt' and 'response' must be strings")
        p, r = tokenizer.encode(prompt), tokenizer.encode(response) + [tokenizer.eos_id]
        return p + r, [False] * len(p) + [True] * len(r)
    raise ValueError(f"{where}: an example needs 'prompt' and 'response', or 'messages'; got keys "
                     f"{sorted(row)}")


def _encode_messages(messages: Any, tokenizer: Tokenizer, where: str) -> tuple[list[int], list[bool]]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                         "{'role': str, 'content': str}")
    tok = _hf(tokenizer)
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"{where}: 'messages' examples need a Hugging Face tokenizer with a chat_template "
                         f"(data.tokenizer); {tokenizer!r} has none. Use 'prompt'/'response' examples "
                         "instead")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message: nothing to train on")

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans, pos = [], 0  # (start, end) character spans of the assistant turns in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else 0
        end = len(render(messages[: i + 1], False))
        if not (pos <= start <= end <= len(full)) or full[:end] != render(messages[: i + 1], False):
            raise ValueError(f"{where}: the chat template does not render conversations prefix by prefix; "
                             "cannot tell the assistant's tokens apart")
        spans.append((start, end))
        pos = end
    ids: list[int] = []
    mask: list[bool] = []
    cursor = 0
    for start, end in [*spans, (len(full), len(full))]:
        for text, trained in ((full[cursor:start], False), (full[start:end], True)):
            if text:
                piece = tokenizer.encode(text)
                ids += piece
                mask += [trained] * len(piece)
        cursor = end
    return ids, mask


def aligned_labels(ids: list[int], mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [n-1], labels [n-1]) of a token sequence: labels[t] = ids[t+1] where that token is
    trained, else -100."""
    x = torch.tensor(ids[:-1], dtype=torch.long)
    y = torch.tensor(ids[1:], dtype=torch.long)
    y[~torch.tensor(mask[1:], dtype=torch.bool)] = IGNORE_INDEX
    return x, y


class SFTBlocks(Dataset):
    """(input_ids, labels), each [block_size] torch.long, from encoded examples (see the module
    docstring for `packing`)."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], block_size: int, packing: bool,
                 pad_id: int) -> None:
        self.block_size, self.packing = block_size, packing
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        n = block_size + 1
        if packing:
            ids = [t for e in examples for t in e[0]]
            mask = [m for e in examples for m in e[1]]
            for s in range(0, len(ids) - n + 1, block_size):  # blocks share one token, as TokenBlocks
                self.rows.append(aligned_labels(ids[s : s + n], mask[s : s + n]))
        else:
            for ids, mask in examples:
                ids, mask = ids[:n], mask[:n]
                pad = n - len(ids)
                self.rows.append(aligned_labels(ids + [pad_id] * pad, mask + [False] * pad))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows[i]


def load_examples(source: str | os.PathLike,
                  tokenizer: str | Tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Every example of `source`, encoded (`encode_example`), in file and line order."""
    tok = get_tokenizer(tokenizer)
    out = []
    for path in sft_files(source):
        for lineno, row in read_json_lines(path):
            ids, mask = encode_example(row, tok, f"{path}:{lineno}")
            if any(mask):
                out.append((ids, mask))
    if not out:
        raise ValueError(f"{source}: no examples with response tokens")
    return out


def build_sft_datasets(source: str | os.PathLike, block_size: int, val_fraction: float,
                       tokenizer: str | Tokenizer,
                       packing: bool = True) -> tuple[SFTBlocks, SFTBlocks | None]:
    """Train and validation sets: the last `val_fraction` of the examples (at least one when
    `val_fraction` > 0) are held out, whole."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    tok = get_tokenizer(tokenizer)
    examples = load_examples(source, tok)
    n_val = max(1, round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(examples):
        raise ValueError(f"{source}: {len(examples)} examples leave none for training with "
                         f"val_fraction={val_fraction}")
    train = SFTBlocks(examples[: len(examples) - n_val], block_size, packing, tok.eos_id)
    if not len(train):
        raise ValueError(f"{source}: fewer than block_size+1={block_size + 1} training tokens to pack; lower "
                         "data.block_size or set data.packing=false")
    val = SFTBlocks(examples[len(examples) - n_val :], block_size, packing, tok.eos_id) if n_val else None
    return train, val if val is None or len(val) else None
