"""Fixtures for trace loader tests: paths to committed samples and the shared real traces."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.traces import traces_dir

DATA = Path(__file__).resolve().parents[2] / "data" / "traces"


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def shared_traces() -> Path:
    root = traces_dir()
    if not (root / "azure_llm_2023").is_dir():
        pytest.skip(f"shared real traces not present at {root}")
    return root
