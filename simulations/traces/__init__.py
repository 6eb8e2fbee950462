"""Trace loaders and generators; every one returns a columnar ``Trace``.

Formats (each module's docstring has the details):

| format | module | source |
|---|---|---|
| Azure LLM inference 2023 / 2024 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``) | ``azure`` | Splitwise / DynamoLLM |
| Mooncake FAST'25 JSONL (``timestamp`` ms, lengths, 512-token ``hash_ids``) | ``mooncake`` | Kimi |
| BurstGPT CSV (``Timestamp,Model,Request tokens,Response tokens,...``), failures flagged | ``burstgpt`` | BurstGPT |
| ServeGen per-client windows + length PDFs, sampled into requests | ``servegen`` | Alibaba Bailian |
| Poisson / Gamma arrivals with fixed or empirical lengths | ``synthetic`` | generated |

Use ``load_trace(name_or_path)`` (names: ``azure-conv``, ``azure-code``,
``mooncake-conv``, ``mooncake-synthetic``, ``servegen-deepseek-r1``,
``servegen-mm-image``, ``servegen-m-large``; folder from
``$PDSERVE_TRACES_DIR`` or ``../shared/traces``). Arrivals are seconds from
the earliest request; rows out of time order are stably sorted, never
rejected. Bad input raises ``TraceFormatError`` naming file, line and field.
Transformations (``scale_rate``, ``time_window``, ``head``, ``sample_rows``,
``tile``) return new traces. Example, the Azure conversation trace as 1M
requests at 10x its rate::

    trace = scale_rate(tile(load_trace("azure-conv"), 1_000_000), 10.0)
"""

from simulations.traces.azure import load_azure_csv
from simulations.traces.burstgpt import load_burstgpt_csv
from simulations.traces.errors import TraceFormatError
from simulations.traces.mooncake import load_mooncake_jsonl
from simulations.traces.registry import SHIPPED_TRACES, TraceFormat, detect_format, load_trace, traces_dir
from simulations.traces.servegen import generate_servegen, load_servegen_clients
from simulations.traces.synthetic import LengthSampler, gamma_trace, poisson_trace, synthetic_trace
from simulations.traces.trace import Trace
from simulations.traces.transforms import head, sample_rows, scale_rate, tile, time_window

__all__ = [
    "SHIPPED_TRACES",
    "LengthSampler",
    "Trace",
    "TraceFormat",
    "TraceFormatError",
    "detect_format",
    "gamma_trace",
    "generate_servegen",
    "head",
    "load_azure_csv",
    "load_burstgpt_csv",
    "load_mooncake_jsonl",
    "load_servegen_clients",
    "load_trace",
    "poisson_trace",
    "sample_rows",
    "scale_rate",
    "synthetic_trace",
    "tile",
    "time_window",
    "traces_dir",
]
