"""``pdserve profile``: measure the engine's step times and write a latency profile.

What it runs, in order, on one ``LLMEngine`` (the tiny random model unless
``--model-dir`` is given):

1. warm-up: a few short prompts, untimed;
2. prefill: for each length in ``--prefill-lengths``, ``--repeats`` single
   prompts of that length, each finishing in one timed ``step()`` (one
   output token, so the step is the prompt's forward plus one sample); the
   repeats give one sample;
3. decode: for each (batch, context) in ``--decode-batches`` x
   ``--decode-contexts``, a batch of prompts of that length is prefilled
   (untimed), ``--warmup-steps`` decode steps run, then ``--decode-steps``
   timed decode steps give one sample whose context is the batch's Σ
   context at the middle timed step.

Repeated timings reduce to one sample with ``--statistic``: ``min`` (the
default) because interference from other processes only ever adds time, so
the fastest run is the most reproducible estimate of the step itself on a
shared machine; ``median`` suits a dedicated GPU.

The samples, a regression fit (``simulations.latency.regression``) and
metadata go to a ``pdserve-latency-profile`` JSON file (format in
``simulations.latency.profile``). The default grid takes well under a minute
on one CPU core with the tiny model.

``profile_engine_config`` does the same for an engine built like a deployed
worker's (the twin check, ``benchmarks/twin.py``, uses it, then adds the
serving overheads it measures against the live endpoint to the file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PREFILL_LENGTHS = (16, 64, 128, 256, 384, 512, 768, 1024)
DEFAULT_DECODE_BATCHES = (1, 2, 4, 8, 16)
DEFAULT_DECODE_CONTEXTS = (64, 256, 1024)


@dataclass(frozen=True)
class ProfileGrid:
    """Which shapes to measure and how often."""

    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS
    decode_batches: tuple[int, ...] = DEFAULT_DECODE_BATCHES
    decode_contexts: tuple[int, ...] = DEFAULT_DECODE_CONTEXTS
    repeats: int = 3  # timed prefills per length
    warmup_steps: int = 2  # untimed decode steps per cell
    decode_steps: int = 8  # timed decode steps per cell
    seed: int = 0
    statistic: str = "min"  # "min" or "median" of repeated timings

    def __post_init__(self) -> None:
        for name in ("prefill_lengths", "decode_batches", "decode_contexts"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be a non-empty list of integers >= 1")
        if self.repeats < 1 or self.decode_steps < 1 or self.warmup_steps < 0:
            raise ValueError("repeats and decode_steps must be >= 1, warmup_steps >= 0")
        if self.statistic not in ("min", "median"):
            raise ValueError(f"statistic must be 'min' or 'median', got {self.statistic!r}")

    def reduce(self, times: list[float]) -> float:
        """One number from repeated timings of the same shape."""
        return min(times) if self.statistic == "min" else statistics.median(times)

    @property
    def num_measurements(self) -> int:
        """Timed measurements (progress bar length)."""
        return len(self.prefill_lengths) + len(self.decode_batches) * len(self.decode_contexts)

    @property
    def max_context(self) -> int:
        """Longest sequence the grid creates."""
        longest_decode = max(self.decode_contexts) + self.warmup_steps + self.decode_steps + 2
        return max(max(self.prefill_lengths) + 2, longest_decode)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return tuple(sorted(set(values)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument(
        "--model-dir", type=Path, help="Hugging Face checkpoint folder (default: the tiny random model)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where the tiny model is created (default: $PDSERVE_CACHE or ~/.cache/pdserve)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("latency-profile.json"), help="profile file to write"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="compute dtype (default: the checkpoint's)",
    )
    parser.add_argument(
        "--prefill-lengths",
        type=_int_list,
        default=DEFAULT_PREFILL_LENGTHS,
        help="prompt lengths, comma-separated",
    )
    parser.add_argument(
        "--decode-batches",
        type=_int_list,
        default=DEFAULT_DECODE_BATCHES,
        help="decode batch sizes, comma-separated",
    )
    parser.add_argument(
        "--decode-contexts",
        type=_int_list,
        default=DEFAULT_DECODE_CONTEXTS,
        help="decode context lengths per request, comma-separated",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per length (default 3)")
    parser.add_argument(
        "--decode-steps", type=int, default=8, help="timed decode steps per (batch, context) cell (default 8)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="untimed decode steps before timing each cell (default 2)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--statistic",
        choices=("min", "median"),
        default="min",
        help="how repeated timings become one sample (default min)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random prompt token ids")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _sync(engine: Any) -> None:
    if engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize(engine.device)


def _timed_step(engine: Any) -> tuple[float, list[Any]]:
    _sync(engine)
    start = time.perf_counter()
    outputs = engine.step()
    _sync(engine)
    return time.perf_counter() - start, outputs


def measure_profile(
    engine: Any, grid: ProfileGrid, sampling_params: Callable[[int], Any], advance: Callable[[int], None]
) -> tuple[list[Any], list[Any]]:
    """Run the grid on ``engine``; ``sampling_params(n)`` makes params for n output tokens; ``advance`` ticks progress."""
    import random

    from simulations.latency.regression import DecodeSample, PrefillSample

    rng = random.Random(grid.seed)
    vocab = engine.model_config.vocab_size
    counter = iter(range(10**9))

    def prompt(length: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(length)]

    def drain() -> None:
        while engine.has_unfinished():
            engine.step()

    for length in (16, 64):  # warm-up: first calls allocate and pick kernels
        engine.add_request(f"warmup-{next(counter)}", prompt(length), sampling_params(2))
    drain()

    prefill: list[PrefillSample] = []
    for length in grid.prefill_lengths:
        times = []
        for _ in range(grid.repeats):
            engine.add_request(f"prefill-{next(counter)}", prompt(length), sampling_params(1))
            times.append(_timed_step(engine)[0])
            drain()
        prefill.append(PrefillSample(length, length * length, grid.reduce(times)))
        advance(1)

    decode: list[DecodeSample] = []
    total_steps = grid.warmup_steps + grid.decode_steps
    for batch in grid.decode_batches:
        for context in grid.decode_contexts:
            ids = [f"decode-{next(counter)}" for _ in range(batch)]
            for rid in ids:
                engine.add_request(rid, prompt(context), sampling_params(total_steps + 2))
            started: set[str] = set()
            while len(started) < batch:  # prefill every prompt (untimed)
                started.update(o.request_id for o in engine.step() if o.request_id in ids)
            for _ in range(grid.warmup_steps):
                engine.step()
            times = [_timed_step(engine)[0] for _ in range(grid.decode_steps)]
            drain()
            # After prefill each sequence holds context + 1 tokens; step k adds one more.
            middle = grid.warmup_steps + (grid.decode_steps + 1) // 2
            decode.append(DecodeSample(batch, batch * (context + middle), grid.reduce(times)))
            advance(1)
    return prefill, decode


def profile_engine_config(model_dir: Path, config: Any, grid: ProfileGrid, out_path: Path) -> tuple[Any, float]:
    """Time ``grid`` on an engine built like ``config`` (an ``EngineConfig``) and write the profile.

    Returns the regression model and the engine's KV bytes per token. Only the room for the
    grid (blocks, model length) differs from ``config``: block size, token budget and max
    sequences are the deployed engine's, so the simulator batches like it.
    """
    import dataclasses

    import torch

    from simulations.latency.profile import LatencyProfile, write_profile
    from simulations.latency.regression import fit_regression
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams

    if max(grid.prefill_lengths) > config.max_num_batched_tokens:
        raise ValueError(f"prefill lengths must fit the engine's token budget {config.max_num_batched_tokens}, "
                         f"so that each timed prefill is one step; got {max(grid.prefill_lengths)}")
    blocks_per_seq = -(-grid.max_context // config.block_size) + 1
    needed = max(grid.decode_batches) * blocks_per_seq + 8
    engine_config = dataclasses.replace(config, num_blocks=max(needed, config.num_blocks or 0),
                                        max_model_len=grid.max_context + config.block_size)
    engine = LLMEngine(model_dir, engine_config)
    prefill, decode = measure_profile(engine, grid, lambda n: SamplingParams(max_tokens=n, ignore_eos=True),
                                      lambda _n: None)
    fit = fit_regression(prefill, decode)
    layout = engine.kv_layout
    kv_bytes_per_token = layout.bytes_per_block / layout.block_size
    metadata: dict[str, str | int | float] = {
        "model": model_dir.name, "model_dir": str(model_dir), "device": str(engine.device),
        "dtype": str(layout.dtype).removeprefix("torch."), "tp_degree": 1, "engine": "pdserve",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "statistic": grid.statistic,
        "block_size": config.block_size, "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_num_seqs": config.max_num_seqs, "kv_bytes_per_token": kv_bytes_per_token,
    }
    write_profile(out_path, LatencyProfile(metadata, tuple(prefill), tuple(decode), fit))
    return fit.model, kv_bytes_per_token


def _progress(total: int, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc="profiling", unit="shape", disable=not enabled)
    return bar.update, bar.close


def _check_args(args: argparse.Namespace) -> None:
    """Raise ValueError for options that would fail only after the engine is built or measured."""
    import os

    import torch

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.output)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"-o {out}: folder {parent} does not exist")
    if out.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"-o {out}: cannot write a file there")
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        raise ValueError(f"--model-dir {args.model_dir}: no such folder")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {args.device}: CUDA is not available here")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {args.device}: only {count} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {args.device!r}: expected cpu, cuda or cuda:N")


def _build_engine(args: argparse.Namespace, grid: ProfileGrid) -> tuple[Path, Any]:
    """The model folder and the engine to profile: sized for ``grid``, on the tiny model unless --model-dir."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine
    from workers.engine.tiny import ensure_tiny_model

    model_dir = args.model_dir or ensure_tiny_model(args.cache_dir)
    block_size = 16
    max_batch = max(grid.decode_batches)
    blocks_per_seq = -(-grid.max_context // block_size) + 1
    config = EngineConfig(
        device=args.device,
        dtype=args.dtype,
        block_size=block_size,
        num_blocks=max_batch * blocks_per_seq + 8,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(max(grid.prefill_lengths), max_batch),
        max_model_len=grid.max_context + block_size,
        num_threads=args.threads,
    )
    return model_dir, LLMEngine(model_dir, config)


def main(args: argparse.Namespace) -> int:
    """Profile the engine and write the profile file; 2 with a message for bad options or models."""
    import sys

    import torch

    from simulations.latency.profile import LatencyProfile, write_profile
    from simulations.latency.regression import fit_regression
    from workers.engine.sampling_params import SamplingParams

    try:
        grid = ProfileGrid(
            prefill_lengths=tuple(args.prefill_lengths),
            decode_batches=tuple(args.decode_batches),
            decode_contexts=tuple(args.decode_contexts),
            repeats=args.repeats,
            warmup_steps=args.warmup_steps,
            decode_steps=args.decode_steps,
            seed=args.seed,
            statistic=args.statistic,
        )
        _check_args(args)
    except ValueError as exc:
        print(f"pdserve profile: {exc}", file=sys.stderr)
        return 2
    try:
        model_dir, engine = _build_engine(args, grid)
    except (OSError, ValueError, RuntimeError) as exc:  # CheckpointError is a ValueError; torch raises RuntimeError
        print(f"pdserve profile: cannot load the model: {exc}", file=sys.stderr)
        return 2
    advance, close = _progress(grid.num_measurements, not args.no_progress)
    try:
        prefill, decode = measure_profile(
            engine, grid, lambda n: SamplingParams(max_tokens=n, ignore_eos=True), advance
        )
    finally:
        close()
    fit = fit_regression(prefill, decode)
    device = str(engine.device)
    if engine.device.type == "cuda":
        device = f"{device} ({torch.cuda.get_device_name(engine.device)})"
    metadata: dict[str, str | int | float] = {
        "model": Path(model_dir).name,
        "model_dir": str(model_dir),
        "device": device,
        "dtype": str(engine.kv_layout.dtype).removeprefix("torch."),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tp_degree": 1,
        "engine": "pdserve",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "statistic": grid.statistic,
        # what a request's KV weighs when it moves: the simulator prices transfers with it
        "kv_bytes_per_token": engine.kv_layout.bytes_per_block / engine.kv_layout.block_size,
    }
    try:
        write_profile(args.output, LatencyProfile(metadata, tuple(prefill), tuple(decode), fit))
    except OSError as exc:  # checked up front, but the folder may change while measuring
        print(f"pdserve profile: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    m = fit.model
    print(f"wrote {args.output}: {len(prefill)} prefill + {len(decode)} decode samples")
    print(
        f"prefill: {m.prefill_fixed_s * 1e3:.3f} ms + {m.prefill_s_per_token * 1e6:.3f} us/token"
        f" + {m.prefill_s_per_token_sq * 1e9:.4f} ns/token^2  (R^2 {fit.prefill_r2:.3f})"
    )
    print(
        f"decode:  {m.decode_fixed_s * 1e3:.3f} ms + {m.decode_s_per_context_token * 1e9:.3f} ns/context token"
        f" + {m.decode_s_per_request * 1e6:.3f} us/request  (R^2 {fit.decode_r2:.3f})"
    )
    return 0


def run(argv: Sequence[str]) -> int:
    """Parse ``argv`` as this command's options and run it (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="pdserve profile")
    add_arguments(parser)
    return main(parser.parse_args(list(argv)))
