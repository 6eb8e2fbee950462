"""The engine: continuous batching over a paged KV cache, plus disaggregation hooks.

Colocated life of a request: ``add_request`` validates it and queues it; each
``step`` schedules decodes and prompt chunks, runs one forward over all of them,
samples, checks stop conditions and returns ``RequestOutput``s; a finished or
aborted request's blocks go back to the free list at once.

Disaggregated life: the decode engine ``reserve``s blocks for the prompt; the
prefill engine's ``prefill`` runs the prompt and hands each layer's K/V to
``on_layer_kv`` as soon as it is computed; the decode engine ``write_layer_kv``s
them into the reserved blocks and ``add_prefilled_request`` joins the request to
its batch. ``resume_request`` recomputes prompt plus generated tokens, to finish
a request whose worker died.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from workers.engine.batch import build_batch
from workers.engine.block_manager import BlockManager, OutOfKVBlocks
from workers.engine.config import EngineConfig, EngineRole, KVReads
from workers.engine.detokenizer import IncrementalDetokenizer
from workers.engine.kv_cache import KVCache, num_blocks_for_budget
from workers.engine.kv_layout import KVLayout
from workers.engine.loader import TokenizerInfo, load_model, load_model_config, load_tokenizer
from workers.engine.model import LayerKVHook
from workers.engine.outputs import (
    CompletionResult,
    DuplicateRequest,
    EngineStats,
    FinishReason,
    InvalidRequest,
    PromptTooLong,
    RequestOutput,
    UnknownRequest,
    WrongRole,
)
from workers.engine.sampler import sample
from workers.engine.sampling_params import InvalidSamplingParams, SamplingParams
from workers.engine.scheduler import ScheduledChunk, Scheduler, Sequence

__all__ = ["LLMEngine", "OutOfKVBlocks"]

# Room kept after a reservation's blocks for tokens it will generate, when the caller does not say.
RESERVE_HEADROOM_TOKENS = 256


class LLMEngine:
    """A Llama-family model served with paged KV and continuous batching on one device."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"EngineConfig.device is {config.device!r} but CUDA is not available")
        if self.device.type == "cpu" and config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.model_dir = Path(model_dir)
        self.model_config = load_model_config(self.model_dir)
        self.model = load_model(self.model_dir, device=config.device, dtype=config.dtype)
        if self.device.type == "cpu":
            self.model.use_column_major_weights()
            if config.packed_lm_head:
                self.model.pack_lm_head()
        has_tokenizer = (self.model_dir / "tokenizer.json").is_file()
        self.tokenizer: TokenizerInfo | None = load_tokenizer(self.model_dir) if has_tokenizer else None
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos.update(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        cfg = self.model_config
        self._layout = KVLayout(
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            block_size=config.block_size,
            dtype=self.model.embed_tokens.weight.dtype,
        )
        num_blocks = config.num_blocks or num_blocks_for_budget(self._layout, config.kv_cache_bytes)
        self.kv_cache = KVCache(self._layout, num_blocks, self.device)
        self.model.set_block_size(config.block_size)
        self._kv_views = config.kv_reads is KVReads.VIEWS or (
            config.kv_reads is KVReads.AUTO and self.device.type == "cpu"
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, config.max_num_batched_tokens, config.role
        )
        # A sequence can never outgrow the whole cache, or it would preempt itself forever.
        limits = {
            "max_position_embeddings": cfg.max_position_embeddings,
            "KV cache capacity (num_blocks * block_size)": num_blocks * config.block_size,
        }
        if config.max_model_len is not None:
            limits["EngineConfig.max_model_len"] = config.max_model_len
        self._window_source = min(limits, key=lambda name: limits[name])
        self.max_model_len = limits[self._window_source]
        self._seqs: dict[str, Sequence] = {}
        self._detoks: dict[str, IncrementalDetokenizer] = {}
        self._reserved: dict[str, int] = {}  # request id -> prompt tokens its blocks were reserved for
        self._pending: list[RequestOutput] = []
        self._arrival = itertools.count()
        self._generator = torch.Generator().manual_seed(config.seed)
        self.num_preemptions = 0  # total since start, for load reports and tests

    # ----- load -------------------------------------------------------------------------------

    @property
    def kv_layout(self) -> KVLayout:
        """Shape and dtype of this engine's KV cache."""
        return self._layout

    @property
    def free_blocks(self) -> int:
        """KV blocks on the free list."""
        return self.blocks.num_free_blocks

    @property
    def total_blocks(self) -> int:
        """KV blocks in the cache."""
        return self.blocks.num_blocks

    @property
    def num_running(self) -> int:
        """Requests in the running batch."""
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for (re)computation."""
        return len(self.scheduler.waiting)

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt (or recompute) tokens not yet in the KV cache, over queued and running requests."""
        return self.scheduler.queued_prefill_tokens

    def stats(self) -> EngineStats:
        """All load figures at once."""
        return EngineStats(
            free_blocks=self.free_blocks,
            total_blocks=self.total_blocks,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_reserved=len(self._reserved),
            queued_prefill_tokens=self.queued_prefill_tokens,
        )

    def has_unfinished(self) -> bool:
        """Whether any request still has outputs to produce."""
        return bool(self._seqs) or bool(self._pending)

    # ----- validation ---------------------------------------------------------------------------

    def _check_new_id(self, request_id: str, allow_reserved: bool = False) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._seqs or (request_id in self._reserved and not allow_reserved):
            raise DuplicateRequest(f"request_id {request_id!r} is already in use")

    def _check_tokens(self, name: str, token_ids: Seq[int], allow_empty: bool = False) -> list[int]:
        ids = list(token_ids)
        if not ids and not allow_empty:
            raise InvalidRequest(f"{name} must not be empty")
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise InvalidRequest(f"{name} holds {t!r}, not a token id in [0, {vocab})")
        return ids

    def _check_sampling(self, sampling: SamplingParams) -> None:
        if not isinstance(sampling, SamplingParams):
            raise InvalidSamplingParams(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        if sampling.stop and self.tokenizer is None:
            raise InvalidSamplingParams(
                f"stop strings need {self.model_dir / 'tokenizer.json'}, which is missing"
            )
        vocab = self.model_config.vocab_size
        for t in sampling.stop_token_ids:
            if not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidSamplingParams(f"stop_token_ids holds {t!r}, not a token id in [0, {vocab})")

    def _check_length(self, num_tokens: int) -> None:
        if num_tokens >= self.max_model_len:
            raise PromptTooLong(
                f"prompt of {num_tokens} tokens leaves no room in the context window of "
                f"{self.max_model_len} tokens (set by {self._window_source})"
            )

    # ----- colocated API ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        sampling: SamplingParams | None = None,
        output_token_ids_so_far: Seq[int] = (),
    ) -> None:
        """Queue a request; with ``output_token_ids_so_far`` it resumes one generated elsewhere."""
        sampling = sampling or SamplingParams()
        self._check_new_id(request_id)
        self._check_sampling(sampling)
        prompt = self._check_tokens("prompt_token_ids", prompt_token_ids)
        generated = self._check_tokens("output_token_ids_so_far", output_token_ids_so_far, allow_empty=True)
        self._check_length(len(prompt) + len(generated))
        if len(generated) >= sampling.max_tokens:
            raise InvalidRequest(
                f"output_token_ids_so_far has {len(generated)} tokens, max_tokens is {sampling.max_tokens}: "
                "nothing left to generate"
            )
        seq = Sequence(request_id, len(prompt), prompt + generated, sampling, next(self._arrival))
        self._seqs[request_id] = seq
        self._detoks[request_id] = self._new_detok(sampling, prompt, generated)
        self.scheduler.add(seq)

    def resume_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        generated_token_ids: Seq[int],
        sampling: SamplingParams | None = None,
    ) -> None:
        """Recompute the KV of prompt plus generated tokens and continue generating."""
        self.add_request(request_id, prompt_token_ids, sampling, output_token_ids_so_far=generated_token_ids)

    def abort(self, request_id: str) -> None:
        """Stop a request (or drop a reservation); its final output says ABORT."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            if request_id in self._reserved:
                self.release(request_id)
                return
            raise UnknownRequest(f"no request with id {request_id!r}")
        self.scheduler.remove(seq)
        self._detoks.pop(request_id, None)
        self._pending.append(self._output(seq, (), "", FinishReason.ABORT))

    def drop(self, request_id: str) -> None:
        """Forget a request whose reader is gone: abort it or release its reservation, with no final output.

        Outputs not yet handed out by ``step`` are discarded too: nobody reads them, and a later
        request reusing the id must not receive them as its own.
        """
        if request_id in self._seqs or request_id in self._reserved:
            self.abort(request_id)
        self._pending = [out for out in self._pending if out.request_id != request_id]

    def step(self) -> list[RequestOutput]:
        """Run one batch and return what every touched request produced."""
        sched = self.scheduler.schedule()
        self.num_preemptions += len(sched.preempted)
        produced = self._run(list(sched.chunks)) if sched.chunks else []
        # taken only now: if the batch raised, queued outputs (an abort's final one) wait for the next step
        outputs, self._pending = self._pending, []
        return outputs + produced

    def generate(
        self, prompts: Seq[Seq[int] | str], sampling: SamplingParams | None = None
    ) -> list[CompletionResult]:
        """Run prompts (token ids or text) to completion alongside any other requests."""
        ids: list[str] = []
        try:
            for prompt in prompts:
                if isinstance(prompt, str):
                    if self.tokenizer is None:
                        raise InvalidRequest(
                            f"text prompts need {self.model_dir / 'tokenizer.json'}, which is missing"
                        )
                    prompt = self.tokenizer.encode(prompt)
                rid = f"generate-{next(self._arrival)}"
                self.add_request(rid, prompt, sampling)
                ids.append(rid)
        except BaseException:  # one bad prompt: none of this call's prompts stays queued, holding blocks
            for rid in ids:
                self.abort(rid)
            added = set(ids)
            self._pending = [out for out in self._pending if out.request_id not in added]
            raise
        tokens: dict[str, list[int]] = {r: [] for r in ids}
        texts: dict[str, list[str]] = {r: [] for r in ids}
        reasons: dict[str, FinishReason] = {}
        others: list[
            RequestOutput
        ] = []  # outputs of requests added elsewhere: handed back by the next step()
        while len(reasons) < len(ids):
            for out in self.step():
                if out.request_id not in tokens:
                    others.append(out)
                    continue
                tokens[out.request_id].extend(out.new_token_ids)
                texts[out.request_id].append(out.new_text)
                if out.finished and out.finish_reason is not None:
                    reasons[out.request_id] = out.finish_reason
        self._pending = others + self._pending
        return [CompletionResult(r, tuple(tokens[r]), "".join(texts[r]), reasons[r]) for r in ids]

    # ----- the step ---------------------------------------------------------------------------

    def _run(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        tables = [self.blocks.table(c.seq.request_id) for c in chunks]
        batch = build_batch(
            chunks, tables, self.config.block_size, self.device, self._layout.dtype, self._kv_views
        )
        hidden = self.model(batch.input_ids, batch.positions, batch.meta, self.kv_cache.layers)
        seqs = [c.seq for c in batch.sample_chunks]
        new_tokens: list[int] = []
        if batch.sample_rows:
            num_rows = len(batch.sample_rows)
            if batch.sample_rows[-1] == num_rows - 1:  # rows 0..n-1 (ascending, distinct): a slice, no gather
                logits = self.model.logits(hidden[:num_rows])
            else:
                rows = torch.tensor(batch.sample_rows, dtype=torch.long).to(self.device)
                logits = self.model.logits(hidden.index_select(0, rows))
            new_tokens = sample(
                logits, [s.sampling for s in seqs], [s.num_output_tokens for s in seqs], self._generator
            )
        # only after sampling: a step that raised must not leave requests with every token computed and
        # none sampled, which the scheduler would never pick again
        for chunk in batch.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        outputs = []
        for seq, token in zip(seqs, new_tokens, strict=True):
            seq.token_ids.append(token)
            detok = self._detoks[seq.request_id]
            detok.add(token)
            reason = self._finish_reason(seq, token)
            text = detok.delta(finished=reason is not None)
            if reason is None and self.config.role is EngineRole.PREFILL_ONLY:
                # handed over, not ended: the decode engine streams the text held back here
                reason = FinishReason.PREFILLED
            if reason is not None:
                self._finish(seq)
            outputs.append(self._output(seq, (token,), text, reason))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Check the stop conditions after ``token`` was appended and fed to the detokenizer."""
        p = seq.sampling
        stopped = self._detoks[seq.request_id].stopped
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids or stopped:
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        del self._seqs[seq.request_id]
        del self._detoks[seq.request_id]

    def _output(
        self, seq: Sequence, tokens: tuple[int, ...], text: str, reason: FinishReason | None
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_text=text,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.prompt_len,
            num_output_tokens=seq.num_output_tokens,
        )

    def _new_detok(
        self, sampling: SamplingParams, prompt: Seq[int], prior: Seq[int]
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, sampling.stop, prompt, prior)

    # ----- disaggregation: prefill side ----------------------------------------------------------

    def prefill(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        sampling: SamplingParams | None = None,
        on_layer_kv: LayerKVHook | None = None,
    ) -> int:
        """Run the whole prompt now and return the first sampled token; layer K/V go to ``on_layer_kv``."""
        if self.config.role is EngineRole.DECODE_ONLY:
            raise WrongRole("a decode-only engine does not serve prefill(); use add_request to recompute")
        sampling = sampling or SamplingParams()
        self._check_new_id(request_id)
        self._check_sampling(sampling)
        prompt = self._check_tokens("prompt_token_ids", prompt_token_ids)
        self._check_length(len(prompt))
        table = self.blocks.ensure_capacity(request_id, len(prompt))
        try:
            seq = Sequence(request_id, len(prompt), list(prompt), sampling, next(self._arrival))
            chunk = ScheduledChunk(seq, len(prompt))
            batch = build_batch(
                [chunk], [table], self.config.block_size, self.device, self._layout.dtype, self._kv_views
            )
            hidden = self.model(
                batch.input_ids, batch.positions, batch.meta, self.kv_cache.layers, on_layer_kv
            )
            logits = self.model.logits(hidden[-1:])
            return sample(logits, [sampling], [0], self._generator)[0]
        finally:
            self.blocks.free(request_id)

    # ----- disaggregation: decode side -----------------------------------------------------------

    def reserve(self, request_id: str, num_tokens: int, max_tokens: int | None = None) -> list[int]:
        """Allocate blocks for a prompt of ``num_tokens`` tokens; raises ``OutOfKVBlocks`` if they are not free.

        ``max_tokens`` (output tokens the request may generate; default ``RESERVE_HEADROOM_TOKENS``)
        only guides placement: room for them is kept after the prompt's blocks where free.
        """
        if self.config.role is EngineRole.PREFILL_ONLY:
            raise WrongRole("a prefill-only engine does not take prefilled requests")
        self._check_new_id(request_id)
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise InvalidRequest(f"num_tokens must be a positive integer, got {num_tokens!r}")
        self._check_length(num_tokens)
        headroom = RESERVE_HEADROOM_TOKENS if max_tokens is None else max_tokens
        table = self.blocks.ensure_capacity(request_id, num_tokens, num_tokens + headroom)
        self._reserved[request_id] = num_tokens
        return list(table)

    def write_layer_kv(
        self, request_id: str, layer_idx: int, k: torch.Tensor, v: torch.Tensor, token_offset: int = 0
    ) -> None:
        """Scatter one layer's ``[num_tokens, kv_heads, head_dim]`` K/V into the reserved blocks."""
        reserved = self._reserved.get(request_id)
        if reserved is None:
            raise UnknownRequest(f"no reservation with id {request_id!r}")
        if token_offset < 0 or token_offset + k.shape[0] > reserved:
            raise InvalidRequest(
                f"K/V of {k.shape[0]} tokens at offset {token_offset} do not fit the {reserved} reserved tokens"
            )
        self.kv_cache.write_layer(layer_idx, self.blocks.table(request_id), k, v, token_offset)

    def add_prefilled_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        first_token_id: int,
        sampling: SamplingParams | None = None,
    ) -> None:
        """Join a request whose prompt KV was written into its reservation; decoding continues from here.

        The first token (sampled by the prefill engine, which streams it) counts as output token 1
        and is checked against the stop conditions; it is not repeated in this engine's outputs.
        """
        reserved = self._reserved.get(request_id)
        if reserved is None:
            raise UnknownRequest(f"no reservation with id {request_id!r}; call reserve() first")
        sampling = sampling or SamplingParams()
        self._check_new_id(request_id, allow_reserved=True)
        self._check_sampling(sampling)
        prompt = self._check_tokens("prompt_token_ids", prompt_token_ids)
        first = self._check_tokens("first_token_id", [first_token_id])[0]
        if len(prompt) != reserved:
            raise InvalidRequest(f"prompt has {len(prompt)} tokens but {reserved} were reserved")
        del self._reserved[request_id]
        seq = Sequence(request_id, len(prompt), [*prompt, first], sampling, next(self._arrival))
        seq.num_computed_tokens = len(prompt)
        self._seqs[request_id] = seq
        # the prefill side streamed the first token's text, less what it held back for stop strings
        detok = self._detoks[request_id] = self._new_detok(sampling, prompt, [first])
        reason = self._finish_reason(seq, first)
        self.scheduler.add_running(seq)
        if reason is not None:
            self._finish(seq)
            self._pending.append(self._output(seq, (), detok.delta(finished=True), reason))

    def release(self, request_id: str) -> None:
        """Drop a reservation whose KV never arrived."""
        if self._reserved.pop(request_id, None) is None:
            raise UnknownRequest(f"no reservation with id {request_id!r}")
        self.blocks.free(request_id)
