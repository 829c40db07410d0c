"""Issue 18 (2): a failed or finished QGaLoreCallback run leaves the (unquantized) module usable: the
`configure_optimizers` wrapper and the layer-wise backward hooks are gone on every exit path, and a
stock `Trainer.fit` with the module's own optimizer then trains exactly as on a fresh copy."""

from __future__ import annotations

import copy
import signal

import lightning as L
import pytest
import torch
from test_callbacks import ToyRegressor, qgalore, trainer

from qgl.callbacks import AdamW8bitCallback, LoRACallback
from qgl.nn import LoRALinear, QLinear
from qgl.optim import QGaLoreAdamW

pytestmark = pytest.mark.usefixtures("one_thread")


class FailsInSetup(L.Callback):
    """A callback after QGaLoreCallback whose setup raises: QGaLoreCallback has already wrapped."""

    def setup(self, trainer, pl_module, stage):
        raise RuntimeError("setup failed")


class Raises(ToyRegressor):
    """Raises `error` in training_step at `at_step` (after the layer-wise hooks have stepped)."""

    def __init__(self, error: type[BaseException], at_step: int = 2) -> None:
        super().__init__()
        self.error, self.at_step = error, at_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.at_step:
            raise self.error("boom")
        return super().training_step(batch, batch_idx)


class TwoGroups(ToyRegressor):
    def configure_optimizers(self):
        return torch.optim.AdamW([{"params": self.head.parameters()},
                                  {"params": [p for n, p in self.named_parameters() if "head" not in n]}])


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters())


def _stock_fit(tmp_path, module: ToyRegressor) -> tuple[dict, L.Trainer]:
    t = trainer(tmp_path / "stock", max_steps=3)
    t.fit(module)
    return module.state_dict(), t


def _assert_usable(tmp_path, module: ToyRegressor) -> None:
    assert "configure_optimizers" not in vars(module) and "configure_model" not in vars(module)
    assert _hooks(module) == 0
    # Same start, the module's own class: a stock run on the used module equals one on a fresh copy.
    fresh = ToyRegressor()
    fresh.load_state_dict(copy.deepcopy(module.state_dict()))
    used_state, t = _stock_fit(tmp_path, module)
    fresh_state, _ = _stock_fit(tmp_path, fresh)
    assert type(t.optimizers[0]) is torch.optim.AdamW
    assert len(module.losses) >= 3 and module.losses[-3:] == fresh.losses[-3:]
    for k, v in fresh_state.items():
        assert torch.equal(v, used_state[k]), k


def _run(tmp_path, module, callbacks, **kwargs) -> BaseException | None:
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a KeyboardInterrupt
    try:
        trainer(tmp_path, callbacks, max_steps=4, **kwargs).fit(module)
    except BaseException as err:  # noqa: B036 - KeyboardInterrupt ends in Lightning's SystemExit
        return err
    finally:
        signal.signal(signal.SIGINT, sigint)
    return None


def test_finished_run(tmp_path):
    module, callback = ToyRegressor(), qgalore(quantize_weights=False, subspace_monitor=False)
    assert _run(tmp_path, module, [callback]) is None
    assert isinstance(callback.optimizer, QGaLoreAdamW) and callback.optimizer.layerwise is not None
    _assert_usable(tmp_path, module)


def test_exception_in_setup(tmp_path):
    module = ToyRegressor()
    err = _run(tmp_path, module, [qgalore(quantize_weights=False), FailsInSetup()])
    assert isinstance(err, RuntimeError) and "setup failed" in str(err)
    _assert_usable(tmp_path, module)


def test_refused_optimizer(tmp_path):
    module = TwoGroups()
    err = _run(tmp_path, module, [qgalore(quantize_weights=False)])
    assert isinstance(err, ValueError) and "single group" in str(err)
    assert "configure_optimizers" not in vars(module)
    assert _hooks(module) == 0


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_in_training_step(tmp_path, error):
    module, callback = Raises(error), qgalore(quantize_weights=False)
    err = _run(tmp_path, module, [callback])
    # Lightning turns a KeyboardInterrupt into SystemExit(1) after calling on_exception.
    assert isinstance(err, RuntimeError if error is RuntimeError else SystemExit), err
    assert len(module.losses) == 2 and _hooks(module) == 0
    module.at_step = -1  # the stock run below must not raise
    _assert_usable(tmp_path, module)


def test_adamw8bit_swap_restores_the_module_on_failure(tmp_path):
    module = Raises(RuntimeError)
    assert isinstance(_run(tmp_path, module, [AdamW8bitCallback()]), RuntimeError)
    module.at_step = -1
    _assert_usable(tmp_path, module)


class BuiltLate(ToyRegressor):
    """`attn` is built in configure_model (after the callbacks' setup, before a checkpoint restore)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = None

    def configure_model(self) -> None:
        if self.attn is None:
            self.attn = torch.nn.Linear(64, 64)


@pytest.mark.parametrize("fails", [False, True])
def test_configure_model_wrapper_is_removed(tmp_path, fails):
    for callback in (qgalore(subspace_monitor=False), LoRACallback(r=4)):
        module = BuiltLate()
        err = _run(tmp_path, module, [callback, *([FailsInSetup()] if fails else [])])
        assert (err is not None) == fails
        assert "configure_model" not in vars(module) and "configure_optimizers" not in vars(module)
        if not fails and isinstance(callback, LoRACallback):
            assert isinstance(module.attn, LoRALinear)
        elif not fails:  # the layer built in configure_model was quantized too
            assert isinstance(module.attn, QLinear)
