"""Continuous batching with chunked prefill, in pure Python (no torch).

A request's life: ``add`` puts it on the waiting queue; a step admits it to the
running list with a first prompt chunk; further chunks follow in later steps until
the whole prompt (plus any tokens generated before a preemption or a resume) is in
the KV cache; then it decodes one token per step until the engine finishes it.

Each step has a token budget (``max_num_batched_tokens``), spent Sarathi-Serve style:
running decodes first (one token each), then the unfinished prompt chunks of running
requests, then new requests from the waiting queue, first come first served. When a
decode needs a block and none is free, the most recently admitted running request is
preempted: its blocks are freed and it goes back to the front of the waiting queue
to be recomputed later. A prefill-only engine runs no decodes: a resumed request's
last uncomputed token is a chunk like any other.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineRole
from workers.engine.sampling_params import SamplingParams


class SeqStatus(Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress; ``token_ids`` is prompt then output."""

    request_id: str
    prompt_len: int
    token_ids: list[int]
    sampling: SamplingParams
    arrival_idx: int
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far (including any generated before a resume)."""
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens."""
        return self.token_ids[self.prompt_len :]

    @property
    def max_num_tokens(self) -> int:
        """Prompt plus the most output tokens the request may reach (a placement hint for its KV)."""
        return self.prompt_len + self.sampling.max_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose K/V are not yet in the cache."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Whether only the last sampled token is missing from the cache."""
        return self.num_output_tokens > 0 and self.num_uncomputed == 1


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """``num_tokens`` tokens of ``seq`` to run this step, starting at ``seq.num_computed_tokens``."""

    seq: Sequence
    num_tokens: int


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """What one step runs (decodes first) and whom it preempted."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...]

    @property
    def num_tokens(self) -> int:
        """Tokens in the step."""
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Decides, every step, which sequences run how many tokens, within budget and KV blocks."""

    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        role: EngineRole = EngineRole.COLOCATED,
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.role = role
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order

    def add(self, seq: Sequence) -> None:
        """Queue a sequence whose tokens still need computing."""
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose KV already sits in its blocks (prefilled elsewhere)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self.running.sort(key=lambda s: s.arrival_idx)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and free its blocks (finish or abort)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.blocks.free(seq.request_id)

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt (or recompute) tokens not yet in the cache, over waiting and running sequences."""
        running = sum(s.num_uncomputed for s in self.running if not self._decodes(s))
        return sum(s.num_uncomputed for s in self.waiting) + running

    def _decodes(self, seq: Sequence) -> bool:
        """Whether ``seq`` runs as a decode; a prefill-only engine has none, so its last token is a chunk."""
        return self.role is not EngineRole.PREFILL_ONLY and seq.is_decoding

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _room_tokens(self, seq: Sequence) -> int:
        """Tokens the sequence could still add with its blocks plus all free blocks."""
        capacity = (
            len(self.blocks.table(seq.request_id)) + self.blocks.num_free_blocks
        ) * self.blocks.block_size
        return capacity - seq.num_computed_tokens

    def schedule(self) -> SchedulerOutput:
        """Form the next step's batch."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()

        if self.role is not EngineRole.PREFILL_ONLY:
            for seq in list(self.running):
                if budget == 0:
                    break
                if seq.status is not SeqStatus.RUNNING or not self._decodes(seq):
                    continue
                while not self.blocks.can_hold(seq.request_id, seq.num_tokens):
                    victims = [s for s in self.running if id(s) not in scheduled and s is not seq]
                    victim = victims[-1] if victims else seq
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    continue
                self.blocks.ensure_capacity(seq.request_id, seq.num_tokens)
                chunks.append(ScheduledChunk(seq, 1))
                scheduled.add(id(seq))
                budget -= 1

        for seq in self.running:
            if budget == 0:
                break
            if id(seq) in scheduled or self._decodes(seq):
                continue
            n = min(seq.num_uncomputed, budget, self._room_tokens(seq))
            if n <= 0:
                continue
            self.blocks.ensure_capacity(seq.request_id, seq.num_computed_tokens + n, seq.max_num_tokens)
            chunks.append(ScheduledChunk(seq, n))
            scheduled.add(id(seq))
            budget -= n

        # After a preemption memory is short: admitting now would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget, self._room_tokens(seq))
            if n <= 0:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.blocks.ensure_capacity(seq.request_id, seq.num_computed_tokens + n, seq.max_num_tokens)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return SchedulerOutput(chunks=tuple(chunks), preempted=tuple(preempted))
