"""One local Ray for the whole runtime test session (starting Ray costs seconds), and helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from runtime_helpers import Reference


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A private local Ray with logical GPUs and pool resources for every deployment of the session."""
    import ray

    from orchestrator.runtime.embedded import init_local_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        yield
        return
    init_local_ray(num_prefill=8, num_decode=8, num_cpus=16)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> Reference:
    """The in-process engine the live system must agree with."""
    return Reference(tiny_model_dir)
