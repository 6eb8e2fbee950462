"""Reading cached K/V in place (views) and gathering it give the same attention, whatever the block tables."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.engine.batch import VIEW_MIN_TOKENS, ModelBatch, build_batch
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import ScheduledChunk, Sequence

BLOCK = 4


def _seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, len(tokens), list(tokens), SamplingParams(), 0)


def _forward(
    engine: LLMEngine, chunks: list[ScheduledChunk], tables: dict[str, list[int]], views: bool
) -> tuple[ModelBatch, dict[str, torch.Tensor]]:
    batch = build_batch(
        chunks, [tables[c.seq.request_id] for c in chunks], BLOCK, engine.device, kv_views=views
    )
    hidden = engine.model(batch.input_ids, batch.positions, batch.meta, engine.kv_cache.layers)
    rows: dict[str, torch.Tensor] = {}
    for chunk, start in zip(batch.chunks, _starts(batch.chunks), strict=True):
        rows[chunk.seq.request_id] = hidden[start : start + chunk.num_tokens]
    return batch, rows


def _starts(chunks: list[ScheduledChunk]) -> list[int]:
    starts, at = [], 0
    for c in chunks:
        starts.append(at)
        at += c.num_tokens
    return starts


def test_views_and_gathers_agree_on_runs_scattered_tables_and_prompt_chunks(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=256, block_size=BLOCK))
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(7)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    seqs = {
        "run": _seq("run", tokens(101)),  # one run of blocks: read in place
        "scattered": _seq("scattered", tokens(90)),  # consecutive blocks out of order: gathered
        "short": _seq("short", tokens(9)),  # below VIEW_MIN_TOKENS: gathered
        "chunked": _seq("chunked", tokens(91)),  # prompt in two chunks: the second reads the first in place
    }
    assert len(seqs["short"].token_ids) < VIEW_MIN_TOKENS < len(seqs["scattered"].token_ids)
    scattered = list(range(100, 123))
    scattered[3], scattered[4] = scattered[4], scattered[3]
    tables = {
        "run": list(range(10, 36)),
        "scattered": scattered,
        "short": [200, 201, 202],
        "chunked": list(range(40, 63)),
    }
    # Cache every prompt but the last token (and only 60 tokens of the chunked one).
    first = [ScheduledChunk(s, s.num_tokens - 1) for r, s in seqs.items() if r != "chunked"]
    first.append(ScheduledChunk(seqs["chunked"], 60))
    _forward(engine, first, tables, views=False)
    for chunk in first:
        chunk.seq.num_computed_tokens += chunk.num_tokens

    step = [ScheduledChunk(seqs[r], 1) for r in ("short", "scattered", "run")]
    step.append(ScheduledChunk(seqs["chunked"], 31))
    viewed, by_views = _forward(engine, step, tables, views=True)
    gathered, by_gathers = _forward(engine, step, tables, views=False)

    assert [s for s, _ in viewed.meta.view_decodes] == [10 * BLOCK]
    assert viewed.meta.prefills[0].context_slot == 40 * BLOCK
    assert not gathered.meta.view_decodes and gathered.meta.prefills[0].context_slot is None
    for rid in seqs:
        torch.testing.assert_close(by_views[rid], by_gathers[rid], rtol=1e-5, atol=1e-5)


def test_engine_keeps_tables_in_one_run_while_requests_grow(hf_tiny_model_dir: Path) -> None:
    engine = LLMEngine(hf_tiny_model_dir, EngineConfig(num_blocks=128, block_size=BLOCK))
    for i, n in enumerate((70, 90, 110)):
        engine.add_request(f"r{i}", [5 + i] * n, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # all three prompts in one step: tables placed with room for 20 more tokens
    for _ in range(12):  # each grows by three blocks, interleaved with the others
        engine.step()
    for i in range(3):
        table = engine.blocks.table(f"r{i}")
        assert table == list(range(table[0], table[0] + len(table)))
