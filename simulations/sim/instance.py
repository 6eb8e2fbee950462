"""One simulated engine instance: continuous batching over a paged KV cache.

A request's queues on an instance, in order:
1. ``waiting`` — needs prefill: a new prompt, a local prefill on a decode
   instance, or a recompute after preemption. It enters a step once the KV
   blocks for its prompt plus the first token are reserved.
2. prefill — PREFILL_FIRST (vLLM-like): whole prompts, and a step with
   prefill runs no decodes; CHUNKED (Sarathi-Serve-like): every step carries
   all running decodes plus prompt chunks up to a per-step token budget.
3. first token — TTFT is recorded; a PREFILL instance hands the request to
   the cluster (KV transfer) and keeps its blocks until the transfer ends;
   other roles move it to ``running``.
4. ``pending_in`` then ``ready`` (decode side of a transfer) — waiting for KV
   blocks to be reserved, then for the KV to land; joins ``running`` at the
   next step boundary.
5. ``running`` — one token per decode step. When the cache cannot hold the
   next tokens, the most recently joined request is preempted: its blocks
   are freed and it returns to the head of ``waiting`` to be recomputed.
6. finished — e2e recorded, blocks freed.

Running requests are not touched per step. A request stores ``offset =
context - step_at_join`` so its context is ``offset + steps``; the instance
keeps ``Σ offset`` and a count of offsets per residue mod block size, which
give Σcontext and the KV blocks a step adds in O(1)/O(block_size). Decode
steps of an unchanged batch are taken as one "run" event that ends at the
next finish; an arrival cuts the run at the first step boundary after it,
so jumping steps changes no result.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from orchestrator.core.types import InstanceHealth, InstanceLoad, Role
from simulations.sim.cost import StepCoster
from simulations.sim.events import EventPriority, Scheduled
from simulations.sim.recorder import BusyTimeline, Recorder
from simulations.sim.types import BatchPolicy, InstanceSpec, LoadReports, SimRequest

__all__ = ["BatchPolicy", "Events", "Instance", "InstanceSink", "InstanceSpec", "SimRequest"]

Events = list[Scheduled] | None


class InstanceSink(Protocol):
    """What an instance asks of its cluster."""

    def prefilled(self, inst: Instance, req: SimRequest, now_s: float) -> Events:
        """A PREFILL instance finished ``req``'s prompt; move its KV to the decode side."""
        ...

    def reserved(self, inst: Instance, req: SimRequest, now_s: float) -> Events:
        """``inst`` reserved blocks for a pending incoming transfer; start it."""
        ...

    def stepped(self, inst: Instance, now_s: float) -> Events:
        """A step ended that finished prefills or requests (only while ``inst.notify_steps`` is set)."""
        ...


class Instance:
    """A simulated engine; entry points return the events they want scheduled."""

    __slots__ = (
        "spec", "index", "coster", "recorder", "sink", "timeline", "health", "notify_steps", "jump",
        "waiting", "ready", "pending_in", "incoming", "running", "finish_heap", "residues", "sum_offset",
        "steps", "used_blocks", "queued_tokens", "newcomers", "last_decode_end_s", "busy", "epoch",
        "run_start_s", "run_k", "run_batch", "run_context", "run_chunks", "run_new", "_load",
        "busy_s", "prefill_tokens_done", "decode_tokens_done", "preemptions", "_on_end", "in_prefill",
        "growth_unreported", "_load_key", "_dirty", "dirty_log", "_reports",
    )

    def __init__(
        self, spec: InstanceSpec, index: int, coster: StepCoster, recorder: Recorder,
        sink: InstanceSink, timeline_bucket_s: float = 1.0, jump: bool = True,
    ) -> None:
        self.spec = spec
        self.index = index
        self.coster = coster
        self.recorder = recorder
        self.sink = sink
        self.timeline = BusyTimeline(timeline_bucket_s)
        self.health = InstanceHealth.HEALTHY
        self.notify_steps = False
        self.jump = jump
        self.waiting: deque[SimRequest] = deque()
        self.ready: list[SimRequest] = []
        self.pending_in: deque[SimRequest] = deque()
        self.incoming = 0  # reserved transfers still in flight
        self.running: dict[int, SimRequest] = {}
        self.finish_heap: list[tuple[int, int]] = []
        self.residues = [0] * spec.block_size
        self.sum_offset = 0
        self.steps = 0  # decode steps taken so far
        self.used_blocks = 0
        self.queued_tokens = 0
        self.newcomers: list[SimRequest] = []
        self.last_decode_end_s = 0.0
        self.busy = False
        self.epoch = 0
        self.run_start_s = 0.0
        self.run_k = 0
        self.run_batch = 0
        self.run_context = 0
        self.run_chunks: list[tuple[SimRequest, int]] = []
        self.run_new: list[SimRequest] = []
        self._load: InstanceLoad | None = None
        self._reports = LoadReports(InstanceLoad(
            instance_id=spec.instance_id, role=spec.role, node_id=spec.node_id, total_kv_blocks=spec.kv_blocks,
            block_size=spec.block_size, max_running_requests=spec.max_running_requests,
        ))
        self._load_key: tuple[int, int, int, int, InstanceHealth] | None = None
        self._dirty = True  # something a load report shows may have changed
        # Indexes of instances that became dirty, for the cluster's snapshot (shared list).
        self.dirty_log: list[int] = []
        self.busy_s = 0.0
        self.prefill_tokens_done = 0
        self.decode_tokens_done = 0
        self.preemptions = 0
        self._on_end: Callable[[float, Any], Events] = self._on_step_end
        self.in_prefill = 0  # requests taken off ``waiting`` into the current step
        # Blocks a decode batch grew by since its membership last changed. Load reports
        # leave them out, so a report changes when the batch does, not every step.
        self.growth_unreported = 0

    # ----- views -------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        """KV blocks that hold ``tokens`` tokens."""
        return -(-tokens // self.spec.block_size)

    @property
    def is_idle(self) -> bool:
        """Whether nothing is queued, in flight, or running here."""
        return not (self.busy or self.waiting or self.ready or self.pending_in or self.running or self.incoming)

    def load(self) -> InstanceLoad:
        """This instance's load report; the same object while the reported numbers do not change."""
        if not self._dirty and self._load is not None:
            return self._load
        self._dirty = False
        spec = self.spec
        waiting = len(self.waiting) + self.in_prefill + len(self.ready) + len(self.pending_in) + self.incoming
        free = spec.kv_blocks - self.used_blocks + self.growth_unreported
        key = (self.queued_tokens, waiting, len(self.running), free, self.health)
        if key != self._load_key or self._load is None:
            self._load_key = key
            self._load = self._reports.build(self.health, self.queued_tokens, waiting, len(self.running),
                                             free if free > 0 else 0)
        return self._load

    def _touch(self) -> None:
        """Note that the load report may change; log this instance once per change."""
        if not self._dirty:
            self._dirty = True
            self.dirty_log.append(self.index)

    def set_health(self, health: InstanceHealth) -> None:
        """Mark the instance (e.g. DRAINING: routing sends nothing new)."""
        self.health = health
        self._touch()

    # ----- entry points ------------------------------------------------------------------
    def enqueue(self, req: SimRequest, now_s: float) -> Events:
        """Queue ``req`` for prefill here."""
        self.waiting.append(req)
        self.queued_tokens += req.prefill_target - req.prefill_done
        self._touch()
        return self._wake(now_s)

    def try_reserve(self, req: SimRequest, now_s: float) -> tuple[bool, Events]:
        """Reserve blocks for an incoming transfer of ``req``'s KV (prompt + first token).

        A decode run holds the blocks of all its steps; blocks of steps not
        started yet are still free, so taking them cuts the run there.
        """
        need = self.blocks_for(req.prompt_tokens + req.generated)
        events: Events = None
        if self.used_blocks + need > self.spec.kv_blocks:
            if not (self.busy and self.run_k > 1):
                return False, None
            j = self.coster.steps_by(self.run_batch, self.run_context, self.run_k, now_s - self.run_start_s)
            spare = self._growth(self.steps, self.run_k) - self._growth(self.steps, j)
            if self.used_blocks - spare + need > self.spec.kv_blocks:
                return False, None
            events = self._cut(now_s)
        self.used_blocks += need
        req.reserved_blocks = need
        self.incoming += 1
        self._touch()
        return True, events

    def wait_for_blocks(self, req: SimRequest) -> None:
        """Queue an incoming transfer until blocks free up."""
        self.pending_in.append(req)
        self._touch()

    def deliver(self, req: SimRequest, now_s: float) -> Events:
        """``req``'s KV landed; it joins the batch at the next step boundary."""
        self.incoming -= 1
        self.ready.append(req)
        self._touch()
        return self._wake(now_s)

    def release(self, req: SimRequest, now_s: float) -> Events:
        """Free the blocks ``req`` held here after its KV left (prefill side)."""
        self.used_blocks -= req.reserved_blocks
        req.reserved_blocks = 0
        self._touch()
        if self.waiting and not self.busy:
            return self._form(now_s)
        return None

    # ----- KV arithmetic over running requests --------------------------------------------
    def _growth(self, s: int, k: int) -> int:
        """Blocks the running batch adds over decode steps s .. s+k-1."""
        bs = self.spec.block_size
        res = self.residues
        if k == 1:  # the common case (a single step, a cut run); what the lines below compute
            return res[(-s) % bs]
        full, rem = divmod(k, bs)
        added = full * len(self.running)
        for j in range(rem):
            added += res[(-(s + j)) % bs]
        return added

    def _safe_steps(self, s: int, free: int, k_max: int) -> int:
        """Most decode steps (<= k_max) whose block growth fits in ``free`` blocks."""
        batch = len(self.running)
        bs = self.spec.block_size
        cycles = min(free // batch, k_max // bs)
        k = cycles * bs
        left = free - cycles * batch
        res = self.residues
        while k < k_max:
            need = res[(-(s + k)) % bs]
            if need > left:
                break
            left -= need
            k += 1
        return k

    def _join(self, req: SimRequest) -> None:
        """Move ``req`` (holding blocks for its whole context) into the running batch."""
        s = self.steps
        ctx = req.prompt_tokens + req.generated
        off = ctx - s
        req.offset = off
        req.end_step = s + req.output_tokens - req.generated
        req.reserved_blocks = 0
        self.running[req.idx] = req
        self.residues[off % self.spec.block_size] += 1
        self.sum_offset += off
        heapq.heappush(self.finish_heap, (req.end_step, req.idx))
        self.newcomers.append(req)
        self.growth_unreported = 0

    def _leave(self, req: SimRequest) -> int:
        """Remove ``req`` from the running batch, free its blocks; return its context."""
        ctx = req.offset + self.steps
        del self.running[req.idx]
        self.residues[req.offset % self.spec.block_size] -= 1
        self.sum_offset -= req.offset
        self.used_blocks -= -(-ctx // self.spec.block_size)
        self.growth_unreported = 0
        return ctx

    def _preempt_last(self) -> None:
        """Recompute-preempt the most recently joined running request."""
        req = self.running[next(reversed(self.running))]
        ctx = self._leave(req)
        if ctx > req.prompt_tokens + req.generated:
            # It decoded since joining (``generated`` is not kept per step), and every run since
            # took all running requests, so its last token came at the end of the last run.
            req.last_token_s = self.last_decode_end_s
        req.generated = ctx - req.prompt_tokens
        req.prefill_target = ctx
        req.prefill_done = 0
        self.waiting.appendleft(req)
        self.queued_tokens += ctx
        self.preemptions += 1
        self.recorder.preemptions[req.idx] += 1

    # ----- steps -------------------------------------------------------------------------
    def _wake(self, now_s: float) -> Events:
        if not self.busy:
            return self._form(now_s)
        if self.run_k > 1:
            return self._cut(now_s)
        return None

    def _cut(self, now_s: float) -> Events:
        """Shorten the current decode run to end at the first step boundary at or after now."""
        batch, ctx, k = self.run_batch, self.run_context, self.run_k
        j = self.coster.steps_by(batch, ctx, k, now_s - self.run_start_s)
        if j >= k:
            return None
        spare = self._growth(self.steps, k) - self._growth(self.steps, j)
        self.used_blocks -= spare
        self.growth_unreported -= spare
        self._touch()
        self.run_k = j
        self.epoch += 1
        end_s = max(now_s, self.run_start_s + self.coster.run_s(batch, ctx, j))
        return [(end_s, EventPriority.STEP_END, self._on_end, self.epoch)]

    def _take_prefill(self, budget: int, whole: bool) -> tuple[list[tuple[SimRequest, int]], int, int]:
        """Pick prompt chunks from the head of ``waiting`` within ``budget`` tokens and free KV."""
        chunks: list[tuple[SimRequest, int]] = []
        tokens = 0
        tokens_sq = 0
        waiting = self.waiting
        slots = self.spec.max_running_requests - len(self.running)
        total = self.spec.kv_blocks
        while waiting and budget > 0:
            req = waiting[0]
            remaining = req.prefill_target - req.prefill_done
            if whole and chunks and remaining > budget:
                break
            if req.prefill_done == 0:
                if len(chunks) >= slots:
                    break
                need = -(-(req.prefill_target + 1) // self.spec.block_size)
                if self.used_blocks + need > total:
                    break
                self.used_blocks += need
                req.reserved_blocks = need
            n = remaining if whole else min(remaining, budget)
            chunks.append((req, n))
            tokens += n
            tokens_sq += n * (n + req.prefill_done)
            budget -= n
            if n < remaining:
                break
            waiting.popleft()
            self.in_prefill += 1
        return chunks, tokens, tokens_sq

    def _plan_steps(self, allow_jump: bool) -> int:
        """Decode steps the next run may take: to the next finish, a KV limit, or 1 (0: must preempt)."""
        heap = self.finish_heap
        running = self.running
        while running.get(heap[0][1]) is None or running[heap[0][1]].end_step != heap[0][0]:
            heapq.heappop(heap)
        k_target = heap[0][0] - self.steps if allow_jump else 1
        # A reservation that fits at the next boundary must be retried there, as step-by-step would.
        if k_target > 1 and (self.pending_in or self.waiting) and self._unblocks_next_boundary():
            k_target = 1
        return self._safe_steps(self.steps, self.spec.kv_blocks - self.used_blocks, k_target)

    def _unblocks_next_boundary(self) -> bool:
        """Whether a queued reservation would fit after one more step (KV only shrinks in a run)."""
        free = self.spec.kv_blocks - self.used_blocks - self._growth(self.steps, 1)
        if self.pending_in:
            head = self.pending_in[0]
            if self.blocks_for(head.prompt_tokens + head.generated) <= free:
                return True
        if self.waiting and self.waiting[0].prefill_done == 0:
            if self.blocks_for(self.waiting[0].prefill_target + 1) <= free:
                return True
        return False

    def _form(self, now_s: float) -> Events:
        """Form and start the next step, or go idle; return its end event."""
        spec = self.spec
        running = self.running
        if self.ready:
            for req in self.ready:
                self._join(req)
            self.ready = []
        chunked = spec.policy is BatchPolicy.CHUNKED
        chunks: list[tuple[SimRequest, int]] = []
        tokens = tokens_sq = 0
        if chunked:
            while running and self._growth(self.steps, 1) > spec.kv_blocks - self.used_blocks:
                self._preempt_last()
            if self.waiting and spec.max_batched_tokens > len(running):
                chunks, tokens, tokens_sq = self._take_prefill(spec.max_batched_tokens - len(running), False)
        elif self.waiting:
            chunks, tokens, tokens_sq = self._take_prefill(spec.max_batched_tokens, True)
        batch = 0
        k = 1
        if running and (chunked or not chunks):
            allow_jump = self.jump and not chunks
            k = self._plan_steps(allow_jump)
            while k == 0 and running:
                self._preempt_last()
                if running:
                    k = self._plan_steps(allow_jump)
            batch = len(running)
            if not batch and not chunks:
                return self._form(now_s) if self.waiting else self._idle()
        if not batch and not chunks:
            return self._idle()
        context = self.sum_offset + batch * self.steps if batch else 0
        if chunks:
            dt = self.coster.mixed_step_s(tokens, tokens_sq, len(chunks), batch, context)
        else:
            dt = self.coster.run_s(batch, context, k)
        if batch:
            growth = self._growth(self.steps, k)
            self.used_blocks += growth
            self.growth_unreported += growth
            new = self.newcomers
            # A request preempted and re-joined appears twice in newcomers; count it once.
            self.run_new = list({r.idx: r for r in new if running.get(r.idx) is r}.values()) if new else new
        self.busy = True
        self.run_start_s = now_s
        self.run_k = k
        self.run_batch = batch
        self.run_context = context
        self.run_chunks = chunks
        self.epoch += 1
        if not self._dirty:  # _touch, inline on the hot path
            self._dirty = True
            self.dirty_log.append(self.index)
        return [(now_s + dt, EventPriority.STEP_END, self._on_end, self.epoch)]

    def _idle(self) -> Events:
        self.busy = False
        self.run_k = 0
        self._touch()
        return None

    def _record_gaps(self, now_s: float) -> None:
        """Add this run's token gaps (each running request's time between tokens) to the histogram."""
        gaps = self.recorder.gaps
        batch, ctx, k = self.run_batch, self.run_context, self.run_k
        first_s = now_s - self.run_start_s if k == 1 else self.coster.run_s(batch, ctx, 1)
        first_end_s = self.run_start_s + first_s
        new = self.run_new
        old = batch - len(new)
        if old:
            gaps.add(first_end_s - self.last_decode_end_s, old)
        for req in new:
            gaps.add(first_end_s - req.last_token_s, 1)
        if k > 1:
            # Steps 2..k: their exact total is known; their spread runs from ~step 2 to step k.
            last_s = self.coster.run_s(batch, ctx + (k - 1) * batch, 1)
            rest_s = now_s - first_end_s
            second_s = first_s + (last_s - first_s) / (k - 1)
            gaps.add_range(second_s, last_s, (k - 1) * batch, rest_s / (k - 1))
        self.newcomers = []
        self.last_decode_end_s = now_s

    def _on_step_end(self, now_s: float, epoch: int) -> Events:
        if epoch != self.epoch:
            return None  # a run that was cut short; its replacement event is queued
        self.busy = False
        if not self._dirty:  # _touch, inline on the hot path
            self._dirty = True
            self.dirty_log.append(self.index)
        self.timeline.add(self.run_start_s, now_s)
        self.busy_s += now_s - self.run_start_s
        out: list[Scheduled] = []
        recorder = self.recorder
        finished_any = False
        if self.run_batch:
            self._record_gaps(now_s)
            self.steps += self.run_k
            self.decode_tokens_done += self.run_k * self.run_batch
            heap = self.finish_heap
            running = self.running
            s = self.steps
            while heap and heap[0][0] <= s:
                end, idx = heapq.heappop(heap)
                req = running.get(idx)
                if req is None or req.end_step != end:
                    continue
                self._leave(req)
                recorder.finish(idx, now_s - req.arrival_s)
                finished_any = True
        chunks = self.run_chunks
        self.run_chunks = []
        for req, n in chunks:
            req.prefill_done += n
            self.queued_tokens -= n
            self.prefill_tokens_done += n
            if req.prefill_done < req.prefill_target:
                continue
            req.generated += 1
            if req.generated == 1:
                recorder.first_token(req.idx, now_s - req.arrival_s)
            else:  # a recompute after preemption: the stall is this token's gap
                recorder.gaps.add(now_s - req.last_token_s, 1)
            req.last_token_s = now_s
            if req.generated >= req.output_tokens:
                self.used_blocks -= req.reserved_blocks
                req.reserved_blocks = 0
                recorder.finish(req.idx, now_s - req.arrival_s)
            elif self.spec.role is Role.PREFILL:
                more = self.sink.prefilled(self, req, now_s)
                if more:
                    out.extend(more)
            else:
                self._join(req)
        self.in_prefill = 0
        while self.pending_in and self.try_reserve(self.pending_in[0], now_s)[0]:
            more = self.sink.reserved(self, self.pending_in.popleft(), now_s)
            if more:
                out.extend(more)
        if self.notify_steps and (finished_any or chunks):
            more = self.sink.stepped(self, now_s)
            if more:
                out.extend(more)
        if not self.busy:
            nxt = self._form(now_s)
            if nxt:
                out.extend(nxt)
        return out
