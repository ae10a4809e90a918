"""Fixtures shared by every test file: the tiny generated data set and the read-only /work/shared material."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.data import load_dogs
from src.synthetic import make_tiny_dataset


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Tests use tiny tensors: one intra-op thread is faster, and immune to OpenMP spin-waits on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
    """A 96-photo, 4-breed Kaggle-layout data set (str path: root/all-dogs, root/Annotation); treat it as read-only."""
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny_dogs")))


@pytest.fixture(scope="session")
def dogs(tiny_data_dir):
    """The tiny data set decoded (DogData); treat it as read-only."""
    return load_dogs(tiny_data_dir, workers=1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """/work/shared (the read-only data packs and weights), or skip the test when it is absent."""
    shared = Path(__file__).resolve().parents[2] / "shared"
    if not shared.is_dir():
        pytest.skip(f"shared material not found at {shared}")
    return shared
