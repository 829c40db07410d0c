"""Issue 17's first list, one test each on the tiny recipe on CPU: NaN training stops (every method),
resume continues exactly, unwritable output fails up front, data and checkpoint errors are one line,
each run has its own directory, files get the umask, a changed method/model on resume is refused."""

import json
import os
import random
import stat
import zipfile
from pathlib import Path

import pytest
import torch

import qgl.lightning.run as run_mod
from qgl.cli import main
from qgl.data.dataset import DataError, load_tokens
from qgl.lightning.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, verify_checkpoint

# A few cheap steps of the tiny recipe, CSV logging, no validation.
FAST = ["data.batch_size=2", "data.block_size=32", "trainer.limit_val_batches=0", "logger.wandb=false",
        "trainer.log_every_n_steps=1", "qgalore.update_proj_gap=2"]


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """An empty working dir, no W&B, one intra-op thread, the shared token cache; env restored."""
    saved, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    cache = os.environ.get("QGL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qgl")
    monkeypatch.setenv("QGL_CACHE", cache)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)
    torch.set_num_threads(threads)


def _all_finite(path: Path) -> bool:
    ckpt = load_checkpoint(path)
    return all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


# ------------------------------------------------------------------ non-finite training
@pytest.mark.parametrize("method", ["full", "qgalore"])
def test_nan_training_stops_nonzero_and_keeps_finite_checkpoints(clean_env, capsys, method):
    """Issue: `method=full optim.lr=1e6 ... checkpoint.every_n_steps=1` exited 0 with NaN in every kept
    checkpoint. Now: exit 1, one line naming the step, and every kept checkpoint is finite."""
    rc = main(["train", *FAST, f"method={method}", "optim.lr=1e6", "trainer.max_steps=6",
               "checkpoint.every_n_steps=1", "logger.name=nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("qgl: error: ") and "non-finite" in err[-1] and "at step " in err[-1]
    assert "Traceback" not in "\n".join(err)
    kept = sorted((clean_env / "runs" / "qgl" / "nan" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in [p.name for p in kept] and all(_all_finite(p) for p in kept), kept
    assert len(kept) == 2  # last.ckpt and the newest finite periodic one, whatever the rotation
    assert "newest good checkpoint: " in err[-1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adamw8bit", "lora", "qlora", "galore"])
def test_nan_training_stops_for_the_other_methods(clean_env, capsys, method):
    rc = main(["train", *FAST, f"method={method}", "optim.lr=1e8", "trainer.max_steps=6",
               "checkpoint.every_n_steps=1", "logger.name=nan", "lora.r=4"])
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite" in err, err[-2000:]
    kept = sorted((clean_env / "runs" / "qgl" / "nan" / "checkpoints").glob("*.ckpt"))
    assert all(_all_finite(p) for p in kept), kept


def test_guard_refuses_to_save_a_nonfinite_state():
    """A state that turned non-finite without a non-finite gradient is never written."""
    from qgl.callbacks import NonFiniteError, NonFiniteGuard

    class T:
        global_step = 7

    ok = {"state_dict": {"w": torch.ones(3), "codes": torch.ones(3, dtype=torch.int8)},
          "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}]}
    NonFiniteGuard().on_save_checkpoint(T(), None, ok)
    bad = {**ok, "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([0.0, float("inf"), 0.0])}}}]}
    with pytest.raises(NonFiniteError, match=r"optimizer\.0\.state\.0\.exp_avg at step 7"):
        NonFiniteGuard().on_save_checkpoint(T(), None, bad)


# ------------------------------------------------------------------ resume
def _losses(summary):
    return summary["train_losses"]


def test_resume_with_larger_max_steps_continues_exactly(clean_env, spy_run, capsys):
    """Issue: max_steps=20 then 40 from last.ckpt kept the 20-step LR schedule and skipped the rest of
    the epoch. Now the resumed losses equal an uninterrupted run's bitwise (warm-up 4 steps, so the
    first 4 steps' LR does not depend on max_steps)."""
    args = ["train", *FAST, "method=full", "optim.warmup_steps=4", "checkpoint.every_n_steps=3"]
    assert main([*args, "trainer.max_steps=8", "logger.name=whole"]) == 0
    assert main([*args, "trainer.max_steps=4", "logger.name=part"]) == 0
    assert main([*args, "trainer.max_steps=8", "logger.name=part", "ckpt_path=last"]) == 0
    whole, first, second = map(_losses, spy_run)
    assert first == whole[:4] and second == whole[4:]
    out = capsys.readouterr().out
    assert "trainer.max_steps 4 -> 8" in out and "continues as an uninterrupted one" in out


@pytest.mark.slow
def test_resume_tiny_recipe_qgalore_20_then_40_bitwise(clean_env, spy_run):
    """The issue's own case, on the tiny recipe's method (qgalore, warm-up 20): 20 + 20 == 40."""
    args = ["train", "data.batch_size=4", "data.block_size=64", "trainer.limit_val_batches=0",
            "logger.wandb=false", "qgalore.update_proj_gap=5", "checkpoint.every_n_steps=7"]
    assert main([*args, "trainer.max_steps=40", "logger.name=whole"]) == 0
    assert main([*args, "trainer.max_steps=20", "logger.name=part"]) == 0
    assert main([*args, "trainer.max_steps=40", "logger.name=part", "ckpt_path=last"]) == 0
    whole, first, second = map(_losses, spy_run)
    assert first == whole[:20] and second == whole[20:]


def test_resume_applies_a_changed_lr_with_a_warning_and_refuses_method_or_model(clean_env, spy_run, capsys):
    args = ["train", *FAST, "method=full", "trainer.max_steps=2", "logger.name=r"]
    assert main(args) == 0
    ckpt = clean_env / "runs" / "qgl" / "r" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main([*args, "trainer.max_steps=3", "optim.lr=5e-3", f"ckpt_path={ckpt}"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr 0.02 -> 0.005" in out and "differs from an uninterrupted one" in out
    # The new lr is what the resumed step used (the schedule at step 2, rebuilt from the config).
    hp = load_checkpoint(ckpt)
    assert hp["lr_schedulers"][0]["base_lrs"] == [5e-3]
    for change, name in (("method=lora", "method"), ("model.name=60m", "model.name")):
        capsys.readouterr()
        assert main([*args, "trainer.max_steps=4", change, "ckpt_path=last"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{name}=" in err[0] and "cannot resume" in err[0], err


# ------------------------------------------------------------------ output directories
@pytest.mark.parametrize("key", ["checkpoint.dir", "logger.save_dir"])
def test_unwritable_output_fails_before_training(clean_env, spy_run, capsys, monkeypatch, key):
    """Issue: an unwritable checkpoint.dir or logger.save_dir failed only after training."""
    (clean_env / "afile").write_text("x")
    built = []
    monkeypatch.setattr(run_mod, "_module", lambda *a: built.append(a))
    assert main(["train", *FAST, f"{key}={clean_env / 'afile' / 'sub'}", "trainer.max_steps=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "cannot write" in err[0], err
    assert built == []  # nothing was built


# ------------------------------------------------------------------ data errors
@pytest.mark.parametrize(("content", "message"), [
    (b'{"text": "ok"}\n{"text": "broken"\n', r"w\.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n', r"w\.jsonl:3: not UTF-8"),
    (b'{"text": 123}\n', r"w\.jsonl:1: field 'text' is int 123, expected a string"),
    (b'["text"]\n', r"w\.jsonl:1: no field 'text'"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, content, message):
    f = tmp_path / "w.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_tokens(f, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.bin"))  # no partial cache entry


def test_non_utf8_text_file_names_the_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"line one\nline two\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"t\.txt:3: not UTF-8 text \(invalid start byte\)"):
        load_tokens(f, cache_dir=tmp_path / "cache")


def test_data_error_is_one_line_from_qgl_train(clean_env, capsys):
    (clean_env / "d.jsonl").write_text('{"text": 1}\n')
    assert main(["train", *FAST, "data.source=d.jsonl", "trainer.max_steps=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qgl: error: ") and "d.jsonl:1:" in err[-1] and "Traceback" not in err


# ------------------------------------------------------------------ checkpoint load errors
def _payload(path: Path) -> tuple[int, int]:
    """Byte range of the largest member's data inside the zip (where a flip changes the payload)."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + n + m
        return start, start + info.compress_size


def test_checkpoint_errors_are_one_line_and_flips_are_detected(tmp_path):
    """Issue: empty file -> bare EOFError, random bytes -> advice to use weights_only=False, flipped
    bytes -> silent load."""
    good = tmp_path / "good.ckpt"
    state = {"state_dict": {"w": torch.randn(64, 64)}, "global_step": 3}
    atomic_torch_save(state, good)
    assert torch.equal(load_checkpoint(good)["state_dict"]["w"], state["state_dict"]["w"])
    data = good.read_bytes()
    cases = {"empty.ckpt": b"", "random.ckpt": random.Random(0).randbytes(5000),
             "cut.ckpt": data[: len(data) // 2]}
    start, stop = _payload(good)
    rng = random.Random(1)
    for i in range(8):  # flips inside the tensor data: the CRC32 of the member no longer matches
        b = bytearray(data)
        b[rng.randrange(start, stop)] ^= 1 << rng.randrange(8)
        cases[f"flip{i}.ckpt"] = bytes(b)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        line = str(e.value)
        assert "\n" not in line and name in line and "weights_only" not in line, line
    # A flip anywhere at all: either an error, or (padding, unused header fields) the same tensors.
    for _ in range(30):
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        (tmp_path / "any.ckpt").write_bytes(bytes(b))
        try:
            loaded = load_checkpoint(tmp_path / "any.ckpt")
        except CheckpointError:
            continue
        assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"]) and loaded["global_step"] == 3


def test_lightning_loads_through_the_verifying_reader(tmp_path):
    """`trainer.fit(ckpt_path=...)` reads through AtomicCheckpointIO: the same checks and errors."""
    from qgl.lightning.checkpoint import AtomicCheckpointIO

    path = tmp_path / "c.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.ones(4)}, path)
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 2
    b = bytearray(path.read_bytes())
    start, stop = _payload(path)
    b[(start + stop) // 2] ^= 0x10
    path.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_checkpoint_with_code_is_refused_without_suggesting_weights_only_false(tmp_path):
    path = tmp_path / "obj.ckpt"
    atomic_torch_save({"x": Path("/")}, path)
    verify_checkpoint(path)  # intact
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "refusing to unpickle" in str(e.value) and "weights_only" not in str(e.value)


def test_corrupt_resume_checkpoint_is_one_line_from_qgl_train(clean_env, capsys):
    (clean_env / "bad.ckpt").write_bytes(b"")
    assert main(["train", *FAST, "ckpt_path=bad.ckpt", "trainer.max_steps=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.ckpt" in err[0] and "empty" in err[0]


# ------------------------------------------------------------------ run directories, file modes
def test_each_run_has_its_own_dir_and_last_resumes_the_newest(clean_env, spy_run, capsys):
    """Issue: checkpoint.dir was shared by every run; a new run wrote last-v1.ckpt and the README's
    resume command picked up an older run."""
    args = ["train", *FAST, "method=full", "trainer.max_steps=2", "logger.name=x",
            "checkpoint.every_n_steps=2"]
    assert main(args) == 0 and main(args) == 0
    root = clean_env / "runs" / "qgl"
    assert sorted(p.name for p in root.iterdir()) == ["x", "x-1"]
    for d in ("x", "x-1"):
        names = sorted(p.name for p in (root / d / "checkpoints").iterdir())
        assert names == ["last.ckpt", "step000002.ckpt"]
        assert json.loads(json.dumps(load_checkpoint(root / d / "checkpoints" / "last.ckpt")["qgl_recipe"]))
    assert main([*args, "trainer.max_steps=3", "ckpt_path=last"]) == 0
    assert spy_run[-1]["run_dir"] == str((root / "x-1").resolve()) and spy_run[-1]["steps"] == 3
    assert load_checkpoint(root / "x" / "checkpoints" / "last.ckpt")["global_step"] == 2  # untouched
    assert not list(root.glob("*/checkpoints/last-v*.ckpt"))
    assert main([*args, "logger.name=nobody", "ckpt_path=last"]) == 1
    assert "no run named 'nobody'" in capsys.readouterr().err


def test_checkpoints_and_cache_files_get_the_umask(clean_env, tmp_path, monkeypatch):
    """Issue: checkpoints and cache files were created mode 0600."""
    old = os.umask(0o022)
    try:
        atomic_torch_save({"a": torch.ones(1)}, tmp_path / "m.ckpt")
        (tmp_path / "t.txt").write_text("some text\n")
        load_tokens(tmp_path / "t.txt", cache_dir=tmp_path / "cache")
        os.umask(0o027)
        atomic_torch_save({"a": torch.ones(1)}, tmp_path / "n.ckpt")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "m.ckpt") == 0o644 and mode(tmp_path / "n.ckpt") == 0o640
    cached = list((tmp_path / "cache").iterdir())
    assert cached and all(mode(p) == 0o644 for p in cached)


def test_ckpt_path_last_with_an_absolute_checkpoint_dir(clean_env):
    """An absolute checkpoint.dir is used as given; `last` is its last.ckpt (nothing is created)."""
    from qgl.config import load_recipe
    from qgl.lightning.resume import RunSetupError, resolve_run

    shared = clean_env / "shared"
    cfg = load_recipe(None, [f"checkpoint.dir={shared}", "ckpt_path=last"])
    with pytest.raises(RunSetupError, match="does not exist"):
        resolve_run(cfg)
    shared.mkdir()
    atomic_torch_save({"global_step": 1}, shared / "last.ckpt")
    paths = resolve_run(cfg)
    assert paths.resume_from == shared / "last.ckpt" and paths.checkpoint_dir == shared
    assert paths.run_dir == Path("runs") / "qgl" / "tiny" and not paths.run_dir.exists()


def test_resume_reads_the_checksums_once(tmp_path, monkeypatch):
    """check_resume verifies the file and remembers it; Lightning's load of the unchanged file skips the
    second read, and only that one load does."""
    import qgl.lightning.checkpoint as ckpt_mod

    path = tmp_path / "a.ckpt"
    atomic_torch_save({"global_step": 1, "w": torch.ones(3)}, path)
    reads = []
    real = zipfile.ZipFile
    monkeypatch.setattr(ckpt_mod.zipfile, "ZipFile", lambda *a, **k: reads.append(1) or real(*a, **k))
    load_checkpoint(path, remember=True)
    ckpt_mod.AtomicCheckpointIO().load_checkpoint(path)
    assert len(reads) == 1
    ckpt_mod.AtomicCheckpointIO().load_checkpoint(path)
    assert len(reads) == 2


def test_resume_from_the_final_periodic_checkpoint_rewrites_a_stale_last(clean_env, spy_run):
    """Killed between the final step's periodic save and its last.ckpt: resuming from the periodic one
    has nothing left to train, and must still leave last.ckpt at the final step."""
    import shutil

    args = ["train", *FAST, "method=full", "logger.name=s", "checkpoint.every_n_steps=1"]
    ckdir = clean_env / "runs" / "qgl" / "s" / "checkpoints"
    assert main([*args, "trainer.max_steps=2"]) == 0
    shutil.copy(ckdir / "last.ckpt", clean_env / "step2.ckpt")
    assert main([*args, "trainer.max_steps=3", "ckpt_path=last"]) == 0
    shutil.copy(clean_env / "step2.ckpt", ckdir / "last.ckpt")  # the kill's leftover: last.ckpt behind
    assert main([*args, "trainer.max_steps=3", f"ckpt_path={ckdir / 'step000003.ckpt'}"]) == 0
    assert load_checkpoint(ckdir / "last.ckpt")["global_step"] == 3
