"""Per-request bookkeeping of the front end: latencies and the one outcome per request."""

from __future__ import annotations

from orchestrator.core.clock import Clock
from orchestrator.runtime.backend import FinishReason, TokenEvent
from orchestrator.runtime.http.errors import APIError
from orchestrator.runtime.metrics import RequestOutcome, ServingMetrics

_FINISH_OUTCOME = {
    FinishReason.STOP: RequestOutcome.STOP,
    FinishReason.LENGTH: RequestOutcome.LENGTH,
    FinishReason.ABORT: RequestOutcome.ABORT,
}


class RequestTracker:
    """Follows one request from arrival to its end and records its metrics exactly once."""

    def __init__(
        self, metrics: ServingMetrics, clock: Clock, arrival_s: float, slo_class: str, prompt_tokens: int = 0
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self.arrival_s = arrival_s
        self.slo_class = slo_class
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.first_token_s: float | None = None
        self.text_parts: list[str] = []
        self.ended = False

    def on_event(self, event: TokenEvent) -> None:
        """Account one backend event (TTFT on the first one that carries tokens)."""
        if self.first_token_s is None and (event.token_ids or event.text):
            self.first_token_s = self._clock.now_s()
            self._metrics.record_first_token(self.slo_class, self.first_token_s - self.arrival_s)
        if event.prompt_tokens:
            self.prompt_tokens = event.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        if event.text:
            self.text_parts.append(event.text)

    @property
    def text(self) -> str:
        """All text received so far."""
        return "".join(self.text_parts)

    def finish(self, reason: FinishReason) -> None:
        """The stream ended normally with ``reason``."""
        if self.ended:
            return
        self.ended = True
        now_s = self._clock.now_s()
        if self.first_token_s is not None:
            self._metrics.record_finished(
                self.slo_class, now_s - self.arrival_s, self.first_token_s - self.arrival_s,
                self.completion_tokens, self.prompt_tokens,
            )
        self._metrics.record_outcome(_FINISH_OUTCOME[reason], reason.value)

    def fail(self, error: APIError) -> None:
        """The request ended with ``error`` (before or during its stream)."""
        if self.ended:
            return
        self.ended = True
        if error.status == 429:
            self._metrics.record_rejection(error.code)
        self._metrics.record_outcome(error.outcome, error.code)

    def client_gone(self) -> None:
        """The client disconnected before the end."""
        if self.ended:
            return
        self.ended = True
        self._metrics.record_outcome(RequestOutcome.ABORT, "client_disconnected")
