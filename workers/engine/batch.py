"""Turn a step's scheduled chunks into flat model inputs and attention metadata.

Single-token chunks (decodes) go first in the flat batch, sorted by context
length and split into groups of similar length; each group shares one padded
attention call, so short contexts are not padded to the longest one. Longer
chunks each get their own call. Slot indices come from the block tables.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from workers.engine.model import AttentionMetadata, DecodeBatch, PrefillChunk
from workers.engine.scheduler import ScheduledChunk


@dataclass(slots=True)
class ModelBatch:
    """Inputs for one forward, plus which flat rows produce logits for which chunk."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    chunks: list[ScheduledChunk]  # in flat-batch order
    sample_rows: list[int]  # flat row of each chunk that samples a token
    sample_chunks: list[ScheduledChunk]


def _slots(table: Seq[int], start: int, end: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def build_batch(
    chunks: Seq[ScheduledChunk],
    tables: Seq[Seq[int]],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> ModelBatch:
    """Flatten ``chunks`` (with their block tables, in the same order) into one model batch."""
    pairs = list(zip(chunks, tables, strict=True))
    decodes = sorted((p for p in pairs if p[0].num_tokens == 1), key=lambda p: p[0].seq.num_computed_tokens)
    ordered = decodes + [p for p in pairs if p[0].num_tokens > 1]
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    sample_rows: list[int] = []
    sample_chunks: list[ScheduledChunk] = []
    prefills: list[PrefillChunk] = []
    decode_tables: list[Seq[int]] = []
    decode_lens: list[int] = []
    for chunk, table in ordered:
        seq = chunk.seq
        start = seq.num_computed_tokens
        end = start + chunk.num_tokens
        q_start = len(input_ids)
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        slot_mapping.extend(_slots(table, start, end, block_size))
        if end == seq.num_tokens:
            sample_rows.append(q_start + chunk.num_tokens - 1)
            sample_chunks.append(chunk)
        if chunk.num_tokens == 1:
            decode_tables.append(table)
            decode_lens.append(end)
        else:
            prefills.append(_prefill_chunk(q_start, start, end, table, block_size, device))
    groups = []
    for lo, hi in _length_groups(decode_lens):
        groups.append(_decode_batch(lo, decode_tables[lo:hi], decode_lens[lo:hi], block_size, device, dtype))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long).to(device),
        decodes=groups,
        prefills=prefills,
    )
    return ModelBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long).to(device),
        positions=torch.tensor(positions, dtype=torch.long).to(device),
        meta=meta,
        chunks=[p[0] for p in ordered],
        sample_rows=sample_rows,
        sample_chunks=sample_chunks,
    )


def _prefill_chunk(
    q_start: int, start: int, end: int, table: Seq[int], block_size: int, device: torch.device
) -> PrefillChunk:
    q_len = end - start
    if start == 0:
        return PrefillChunk(q_start=q_start, q_len=q_len, context_len=end, context_blocks=None, mask=None)
    blocks = torch.tensor(table[: -(-end // block_size)], dtype=torch.long)
    # Query i sits at position start + i and may see keys at positions <= start + i.
    mask = torch.arange(end)[None, :] <= (start + torch.arange(q_len))[:, None]
    return PrefillChunk(
        q_start=q_start, q_len=q_len, context_len=end, context_blocks=blocks.to(device), mask=mask.to(device)
    )


# A decode group is closed once a context would exceed this multiple of the group's shortest.
_GROUP_LENGTH_RATIO = 1.5
# Contexts this short are never worth a separate attention call.
_GROUP_MIN_TOKENS = 128


def _length_groups(sorted_lens: list[int]) -> list[tuple[int, int]]:
    """Split ascending context lengths into ``[lo, hi)`` runs of similar length."""
    groups: list[tuple[int, int]] = []
    lo = 0
    for i, n in enumerate(sorted_lens):
        if i > lo and n > max(_GROUP_MIN_TOKENS, _GROUP_LENGTH_RATIO * sorted_lens[lo]):
            groups.append((lo, i))
            lo = i
    if sorted_lens:
        groups.append((lo, len(sorted_lens)))
    return groups


def _decode_batch(
    row_start: int,
    tables: Seq[Seq[int]],
    context_lens: list[int],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> DecodeBatch:
    max_len = max(context_lens)
    max_blocks = -(-max_len // block_size)
    flat = [0] * (len(tables) * max_blocks)
    for row, (table, n) in enumerate(zip(tables, context_lens, strict=True)):
        used = -(-n // block_size)
        flat[row * max_blocks : row * max_blocks + used] = table[:used]
    lens = torch.tensor(context_lens, dtype=torch.long)
    padding = (torch.arange(max_len)[None, :] >= lens[:, None])[:, None, None, :]
    # An additive float mask takes a faster path in CPU attention than a boolean one.
    mask = torch.zeros(padding.shape, dtype=dtype).masked_fill_(padding, float("-inf"))
    return DecodeBatch(
        row_start=row_start,
        num_seqs=len(tables),
        max_context=max_len,
        block_ids=torch.tensor(flat, dtype=torch.long).to(device),
        mask=mask.to(device),
    )
