"""Turn a step's scheduled chunks into flat model inputs and attention metadata.

Single-token chunks (decodes) go first in the flat batch. With ``kv_views`` a
decode whose context sits in consecutive cache slots (its blocks form one run, the
block manager's preferred placement) is read in place by its own attention call;
that saves copying the whole context every layer of every step, which costs more
than the call on CPU. The other decodes are sorted by context length and split into
groups of similar length; each group gathers its blocks into one padded attention
call, so short contexts are not padded to the longest one. Longer chunks each get
their own call, reading earlier context in place or gathered. Slot indices come
from the block tables.
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
    sample_rows: list[int]  # flat row of each chunk that samples a token, ascending
    sample_chunks: list[ScheduledChunk]


# Contexts shorter than this are gathered into a padded group even when they could be read in
# place: copying them costs less than one more attention call.
VIEW_MIN_TOKENS = 64


def run_start_slot(table: Seq[int], num_tokens: int, block_size: int) -> int | None:
    """First cache slot of positions ``[0, num_tokens)`` if they lie in consecutive slots, else None."""
    used = -(-num_tokens // block_size)
    first = table[0]
    if table[used - 1] - first != used - 1:
        return None
    if used > 2 and list(table[:used]) != list(range(first, first + used)):
        return None
    return first * block_size


def build_batch(
    chunks: Seq[ScheduledChunk],
    tables: Seq[Seq[int]],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    kv_views: bool = False,
) -> ModelBatch:
    """Flatten ``chunks`` (with their block tables, in the same order) into one model batch.

    ``kv_views`` lets attention read contexts held in consecutive slots in place.
    """
    views: list[tuple[ScheduledChunk, int]] = []
    gathered: list[tuple[ScheduledChunk, Seq[int]]] = []
    prompts: list[tuple[ScheduledChunk, Seq[int]]] = []
    for chunk, table in zip(chunks, tables, strict=True):
        if chunk.num_tokens > 1:
            prompts.append((chunk, table))
            continue
        context = chunk.seq.num_computed_tokens + 1
        slot = run_start_slot(table, context, block_size) if kv_views and context >= VIEW_MIN_TOKENS else None
        if slot is None:
            gathered.append((chunk, table))
        else:
            views.append((chunk, slot))
    gathered.sort(key=lambda p: p[0].seq.num_computed_tokens)

    # Flat order: viewed decodes, gathered decodes, then prompt chunks.
    ordered = [c for c, _ in views] + [c for c, _ in gathered] + [c for c, _ in prompts]
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    view_decodes: list[tuple[int, int]] = []
    for chunk, slot in views:
        pos = chunk.seq.num_computed_tokens
        input_ids.append(chunk.seq.token_ids[pos])
        positions.append(pos)
        slot_mapping.append(slot + pos)
        view_decodes.append((slot, pos + 1))
    decode_tables: list[Seq[int]] = []
    decode_lens: list[int] = []
    for chunk, table in gathered:
        pos = chunk.seq.num_computed_tokens
        input_ids.append(chunk.seq.token_ids[pos])
        positions.append(pos)
        slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
        decode_tables.append(table)
        decode_lens.append(pos + 1)
    # A single-token chunk is usually a decode, but can be one token of a prompt that does not sample.
    sample_rows = [
        row
        for row, c in enumerate(ordered[: len(input_ids)])
        if c.seq.num_computed_tokens + 1 == c.seq.num_tokens
    ]
    sample_chunks = [ordered[row] for row in sample_rows]
    prefills: list[PrefillChunk] = []
    for chunk, table in prompts:
        seq = chunk.seq
        start = seq.num_computed_tokens
        end = start + chunk.num_tokens
        q_start = len(input_ids)
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        if end == seq.num_tokens:
            sample_rows.append(q_start + chunk.num_tokens - 1)
            sample_chunks.append(chunk)
        prefills.append(_prefill_chunk(q_start, start, end, table, block_size, device, dtype, kv_views))
    groups = [
        _decode_batch(len(views) + lo, decode_tables[lo:hi], decode_lens[lo:hi], block_size, device, dtype)
        for lo, hi in _length_groups(decode_lens)
    ]
    # One host-to-device copy for the three per-token index vectors.
    num_tokens = len(input_ids)
    packed = torch.tensor(input_ids + positions + slot_mapping, dtype=torch.long).to(device)
    ids, pos_t, slots = packed.split(num_tokens)
    return ModelBatch(
        input_ids=ids,
        positions=pos_t,
        meta=AttentionMetadata(
            slot_mapping=slots, decodes=groups, prefills=prefills, view_decodes=view_decodes
        ),
        chunks=ordered,
        sample_rows=sample_rows,
        sample_chunks=sample_chunks,
    )


def _prefill_chunk(
    q_start: int,
    start: int,
    end: int,
    table: Seq[int],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    kv_views: bool,
) -> PrefillChunk:
    q_len = end - start
    if start == 0:
        return PrefillChunk(q_start=q_start, q_len=q_len, context_len=end, context_blocks=None, mask=None)
    # Query i sits at position start + i and may see keys at positions <= start + i. An additive
    # float mask takes a faster path in CPU attention than a boolean one.
    hidden = torch.arange(end)[None, :] > (start + torch.arange(q_len))[:, None]
    mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf")).to(device)
    slot = run_start_slot(table, end, block_size) if kv_views else None
    if slot is not None:
        return PrefillChunk(
            q_start=q_start, q_len=q_len, context_len=end, context_blocks=None, mask=mask, context_slot=slot
        )
    blocks = torch.tensor(table[: -(-end // block_size)], dtype=torch.long).to(device)
    return PrefillChunk(q_start=q_start, q_len=q_len, context_len=end, context_blocks=blocks, mask=mask)


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
