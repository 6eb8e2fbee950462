"""Prefill in one OS process, decode in another, KV over each real transport: same greedy tokens."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.engine.sampling_params import SamplingParams
from workers.kv.descriptor import TransportKind
from workers.kv.local_pair import LocalPair, PairRequest, reference_tokens

pytestmark = pytest.mark.slow

KINDS = [TransportKind.TCP, TransportKind.SHM, TransportKind.TORCH_DIST]
if importlib.util.find_spec("nixl") is not None:  # optional backend, tested when installed
    KINDS.append(TransportKind.NIXL)
PROMPT_LENGTHS = (5, 60, 300)
SAMPLING = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts() -> list[tuple[int, ...]]:
    rng = random.Random(7)
    return [tuple(rng.randrange(10, 30000) for _ in range(n)) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, prompts: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return reference_tokens(tiny_model_dir, prompts, SAMPLING)


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path) -> Iterator[LocalPair]:
    # one decode and one prefill process serve every transport: process start-up dominates the cost
    with LocalPair(tiny_model_dir, KINDS) as p:
        yield p


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_disaggregated_tokens_match_single_process(
    pair: LocalPair, kind: TransportKind, prompts: list[tuple[int, ...]], expected: list[tuple[int, ...]]
) -> None:
    for i, prompt in enumerate(prompts):
        result = pair.run(PairRequest(f"{kind.value}-{i}", prompt, SAMPLING, kind=kind))
        assert result.token_ids == expected[i], f"{kind.value}: prompt of {len(prompt)} tokens diverged"
        assert len(result.token_ids) == SAMPLING.max_tokens
        # 4 layers x tokens x 2 kv heads x 64 dims x fp32 x (K and V)
        assert result.recv_stats.num_bytes == result.send_stats.num_bytes == 4 * len(prompt) * 2 * 64 * 4 * 2


def test_without_layerwise_overlap_tokens_still_match(
    pair: LocalPair, prompts: list[tuple[int, ...]], expected: list[tuple[int, ...]]
) -> None:
    result = pair.run(PairRequest("no-overlap", prompts[2], SAMPLING, kind=TransportKind.TCP, overlap=False))
    assert result.token_ids == expected[2]
