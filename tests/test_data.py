"""Tokenizer, cached token streams, blocks, sources, and the resumable TextDataModule."""

import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from qgl.data import (
    CORPUS_PATH,
    ByteTokenizer,
    TokenBlocks,
    build_datasets,
    get_tokenizer,
    load_tokens,
    resolve_source,
)
from qgl.data.datamodule import TextDataModule
from qgl.data.dataset import read_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QGL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    original = ByteTokenizer.encode

    def encode(self, text):
        calls.append(len(text))
        return original(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode", encode)
    return calls


def words(n: int, start: int = 0) -> str:
    # Distinct words, so that every block of the stream is distinct.
    return " ".join(f"w{i}" for i in range(start, start + n))


# --- tokenizer ---------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    text = "It is a truth universally acknowledged — £20,000 and 🙂"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_id]) == text  # special ids carry no text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_tokenizer_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt2")  # not a local directory: never fetched from a hub
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="transformers"):
        get_tokenizer(str(tmp_path))


# --- blocks ------------------------------------------------------------------------------------

def test_token_blocks_shift_and_length():
    tokens = torch.arange(100)
    ds = TokenBlocks(tokens, block_size=8)
    assert len(ds) == 12  # (100 - 1) // 8
    x, y = ds[3]
    assert x.dtype == torch.long and x.shape == y.shape == (8,)
    assert torch.equal(x, torch.arange(24, 32)) and torch.equal(y, torch.arange(25, 33))
    assert torch.equal(ds[-1][1], torch.arange(89, 97))
    with pytest.raises(IndexError):
        ds[12]
    part = TokenBlocks(tokens.numpy(), 8, start=50, stop=70)
    assert len(part) == 2 and torch.equal(part[1][1], torch.arange(59, 67))
    with pytest.raises(ValueError, match="too few"):
        TokenBlocks(tokens, block_size=100)


def test_memmap_blocks_pickle_without_copying(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(100_000, dtype=np.uint32).tofile(path)
    ds = TokenBlocks(np.memmap(path, dtype=np.uint32, mode="r"), 16, start=1000)
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # the path, not the 400 kB of tokens
    again = pickle.loads(blob)
    assert len(again) == len(ds) and torch.equal(again[5][0], ds[5][0])


# --- sources and cache -------------------------------------------------------------------------

def test_embedded_corpus():
    assert CORPUS_PATH.stat().st_size < 3_000_000
    tokens = load_tokens("corpus")
    assert np.array_equal(load_tokens("embedded"), tokens)
    assert tokens.dtype == np.uint16 and len(tokens) == 4_024_612 and tokens[-1] == 256
    assert ByteTokenizer().decode(tokens[:21].tolist()) == "SENSE AND SENSIBILITY"
    train, val = build_datasets("corpus", block_size=256, val_fraction=0.01)
    assert len(train) > 15_000 and len(val) > 100
    # The held-out end of the stream is the end of Persuasion.
    text = read_corpus()
    assert ByteTokenizer().decode(val[len(val) - 1][1].tolist()) in text[-1000:]


def test_cache_hit_on_second_load(count_encodes, _cache):
    first = load_tokens("corpus")
    calls = len(count_encodes)
    assert calls > 0
    second = load_tokens("corpus")
    assert len(count_encodes) == calls, "the second load tokenized again"
    assert np.array_equal(first, second)
    meta = json.loads(next(_cache.glob("corpus-*.json")).read_text())
    assert meta["tokenizer"] == "byte" and meta["num_tokens"] == len(first) and meta["dtype"] == "uint16"


def test_cache_follows_content(tmp_path, count_encodes):
    f = tmp_path / "a.txt"
    f.write_text("first version")
    assert ByteTokenizer().decode(load_tokens(f)) == "first version"
    f.write_text("second version")
    assert ByteTokenizer().decode(load_tokens(f)) == "second version"
    assert len(count_encodes) == 2


def test_long_text_is_tokenized_in_pieces(tmp_path, monkeypatch, count_encodes):
    monkeypatch.setattr("qgl.data.dataset._PIECE_CHARS", 100)
    text = "\r\n".join(words(20, 20 * i) for i in range(30))  # 30 lines, CRLF kept as stored
    (tmp_path / "long.txt").write_bytes(text.encode())
    tokens = load_tokens(tmp_path / "long.txt").tolist()
    assert tokens == [*text.encode(), 256]  # one document: a single eos, at the end
    assert len(count_encodes) > 10 and max(count_encodes) < 300


def test_failed_tokenization_leaves_no_partial_file(tmp_path, monkeypatch, _cache):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(words(50, 100 * i))
    calls = []

    def flaky(self, text):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-way")
        return list(text.encode())

    monkeypatch.setattr(ByteTokenizer, "encode", flaky)
    with pytest.raises(RuntimeError, match="mid-way"):
        load_tokens(folder)
    assert list(_cache.iterdir()) == []  # no .bin, no .json, no temporary file
    monkeypatch.undo()
    assert len(load_tokens(folder)) == sum(len(words(50, 100 * i)) + 1 for i in range(3))


def test_local_txt_and_jsonl_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.jsonl").write_text(
        json.dumps({"body": "beta", "id": 1}) + "\n\n" + json.dumps({"body": "gamma"}) + "\n")
    (folder / "notes.csv").write_text("ignored")
    tokens = load_tokens(folder, text_field="body").tolist()
    tok = ByteTokenizer()
    assert tokens == [*tok.encode("alpha"), 256, *tok.encode("beta"), 256, *tok.encode("gamma"), 256]
    with pytest.raises(ValueError, match=r"b\.jsonl:1: no field 'text'"):
        load_tokens(folder)


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found.*corpus.*hf:"):
        load_tokens(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        load_tokens(tmp_path / "empty")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"`datasets`.*pip install"):
        load_tokens("hf:wikitext:wikitext-2-raw-v1")


def test_hf_source_through_datasets(monkeypatch):
    class FakeDataset(list):
        column_names = ["text", "label"]
        _fingerprint = "abc123"

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset([{"text": "one"}, {"text": "two"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = resolve_source("hf:wikitext:wikitext-2-raw-v1", hf_split="validation")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")] and src.fingerprint == "abc123"
    assert ByteTokenizer().decode(load_tokens("hf:wikitext:wikitext-2-raw-v1")) == "onetwo"
    with pytest.raises(ValueError, match="no column 'content'"):
        resolve_source("hf:wikitext", text_field="content")


def test_val_split_is_the_end_of_the_stream(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text(words(400))
    tokens = load_tokens(f)
    train, val = build_datasets(f, block_size=16, val_fraction=0.1)
    assert train.stop == val.start == len(tokens) - int(len(tokens) * 0.1)
    assert build_datasets(f, block_size=16, val_fraction=0.0)[1] is None
    with pytest.raises(ValueError, match="fewer than one block"):
        build_datasets(f, block_size=512, val_fraction=0.1)


# --- datamodule --------------------------------------------------------------------------------

def make_dm(source, **kw) -> TextDataModule:
    kw = {"block_size": 8, "batch_size": 4, "val_fraction": 0.1, "seed": 3, **kw}
    dm = TextDataModule(source, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def keys(batch) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for row in batch[0]]


def test_datamodule_batches_and_determinism(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text(words(300))
    dm = make_dm(f)
    assert dm.vocab_size == 257
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    epoch0 = [k for b in make_dm(f).train_dataloader() for k in keys(b)]
    assert epoch0 == [k for b in dm.train_dataloader() for k in keys(b)]  # same seed, same order
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    assert [k for b in loader for k in keys(b)] != epoch0  # a new shuffle each epoch
    assert next(iter(dm.val_dataloader()))[0].shape == (4, 8)


def test_datamodule_resumes_without_trainer(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text(words(300))
    dm = make_dm(f)
    it = iter(dm.train_dataloader())
    seen = [keys(next(it)) for _ in range(3)]
    state = dm.state_dict()
    assert state["epoch"] == 0 and state["batches_seen"] == 3
    rest = [keys(b) for b in it]
    resumed = make_dm(f)
    resumed.load_state_dict(state)
    assert [keys(b) for b in resumed.train_dataloader()] == rest
    assert len(seen) + len(rest) == dm.batches_per_epoch
    with pytest.raises(ValueError, match="seed"):
        make_dm(f, seed=4).load_state_dict(state)


class _Recorder:
    """A LightningModule (built lazily: lightning is imported by the test only) that records the
    training batches it sees."""

    @staticmethod
    def make():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen = []

            def training_step(self, batch, batch_idx):
                self.seen.append(keys(batch))
                return (self.w * batch[0].float().mean()).sum() ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Recorder()


def _fit(dm, tmp_path, ckpt_path=None, every=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                 filename="{step}")] if every else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        enable_checkpointing=bool(every), callbacks=callbacks)
    model = _Recorder.make()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`", "ignore:.*LeafSpec",
                            "ignore:Be aware that when using `ckpt_path`")
def test_lightning_resume_continues_with_the_next_batch(tmp_path):
    f = tmp_path / "w.txt"
    f.write_text(words(110))  # 12 training batches of 4 x 8 tokens per epoch
    dm = make_dm(f)
    assert dm.batches_per_epoch == 12
    full = _fit(dm, tmp_path, every=6)  # checkpoints after steps 6 (mid-epoch), 12 (epoch end), 18, 24
    assert len(full) == 24 and full[:12] != full[12:]
    for step in (6, 12, 18):
        resumed = _fit(make_dm(f), tmp_path, ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed == full[step:], f"resuming from step {step}"
