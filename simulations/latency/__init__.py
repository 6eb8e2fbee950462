"""Latency models: how long one engine step takes for a given batch shape.

Every model implements ``base.LatencyModel.step_time_s(shape, tp_degree)``:

| model | module | use |
|---|---|---|
| ``RegressionLatency`` | ``regression`` | per-phase least-squares fit of a profile (the default for simulation) |
| ``TableLatency`` | ``table`` | linear / bilinear interpolation over a profiled grid |
| ``RooflineLatency`` | ``roofline`` | estimate for a named GPU and model without a profile |
| ``ZeroLatency``, ``FixedLatency`` | ``trivial`` | tests |
| ``OverheadLatency`` | ``overhead`` | wraps any model: adds measured per-step serving overheads |

Profiles (``profile``) are JSON files written by ``pdserve profile``:
``load_profile(path)`` gives the regression model, ``load_table(path)`` the
table model, ``load_overheads(path)`` the serving overheads measured against
a live endpoint (``overhead.Overheads``: per request, per hand-off, per
prefill and decode step; ``with_step_overheads`` applies the per-step ones).
``hardware`` has the GPU table (with the source of every
number), model shapes, and ``kv_bytes_per_token`` / ``kv_capacity_tokens``
for sizing an instance's KV cache. ``tp.TpScaling`` is how profiled models
extrapolate to tensor parallelism.
"""

from simulations.latency.base import BatchShape, LatencyModel
from simulations.latency.hardware import (
    GPUS,
    MODELS,
    GpuSpec,
    ModelSpec,
    kv_bytes_per_token,
    kv_capacity_tokens,
)
from simulations.latency.overhead import (
    IdleSample,
    OverheadLatency,
    Overheads,
    Probe,
    fit_overheads,
    probe_plan,
    with_step_overheads,
)
from simulations.latency.profile import (
    LatencyProfile,
    ProfileFormatError,
    load_overheads,
    load_profile,
    load_table,
    read_profile,
    write_profile,
)
from simulations.latency.regression import (
    DecodeSample,
    PrefillSample,
    RegressionFit,
    RegressionLatency,
    fit_regression,
)
from simulations.latency.roofline import RooflineLatency, tp_scaling_for
from simulations.latency.table import TableLatency, table_from_samples
from simulations.latency.tp import TpScaling
from simulations.latency.trivial import FixedLatency, ZeroLatency

__all__ = [
    "GPUS",
    "MODELS",
    "BatchShape",
    "DecodeSample",
    "FixedLatency",
    "GpuSpec",
    "IdleSample",
    "LatencyModel",
    "LatencyProfile",
    "ModelSpec",
    "OverheadLatency",
    "Overheads",
    "PrefillSample",
    "Probe",
    "ProfileFormatError",
    "RegressionFit",
    "RegressionLatency",
    "RooflineLatency",
    "TableLatency",
    "TpScaling",
    "ZeroLatency",
    "fit_overheads",
    "fit_regression",
    "kv_bytes_per_token",
    "kv_capacity_tokens",
    "load_overheads",
    "load_profile",
    "load_table",
    "probe_plan",
    "read_profile",
    "table_from_samples",
    "tp_scaling_for",
    "with_step_overheads",
    "write_profile",
]
