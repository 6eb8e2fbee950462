"""One private local Ray for the twin tests, shut down by the fixture that started it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def twin_ray() -> Iterator[None]:
    """A local Ray with logical GPUs and pool resources (reused if already up).

    Sized like the runtime tests' session Ray, so whichever suite starts Ray
    first, the other's deployments fit in it (the resources are logical).
    """
    import ray

    from orchestrator.runtime.embedded import init_local_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        yield
        return
    init_local_ray(num_prefill=8, num_decode=8, num_cpus=16)
    yield
    ray.shutdown()
