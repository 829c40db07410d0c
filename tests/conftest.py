"""Shared test set-up: Triton kernels run under the interpreter on CPU; `cuda` tests skip there."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: kernels then run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
