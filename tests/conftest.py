"""Fixtures shared by every test file: the tiny generated data set and the read-only /work/shared material."""
from __future__ import annotations

from pathlib import Path

import pytest

from src.synthetic import make_tiny_dataset


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
    """A 96-photo, 4-breed Kaggle-layout data set (str path: root/all-dogs, root/Annotation); treat it as read-only."""
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny_dogs")))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """/work/shared (the read-only data packs and weights), or skip the test when it is absent."""
    shared = Path(__file__).resolve().parents[2] / "shared"
    if not shared.is_dir():
        pytest.skip(f"shared material not found at {shared}")
    return shared
