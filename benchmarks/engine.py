"""Generation throughput of pdserve's engine against transformers' ``generate`` on the same tiny model.

Both run in this process, one torch thread each, on the same weights, and produce
the same number of tokens: a single prompt (batch 1), and a batch of prompts of
mixed lengths that transformers runs as one left-padded batch and pdserve runs with
continuous batching and chunked prefill. Prints medians over repetitions and the
ratio pdserve / transformers (above 1 means pdserve is faster).

Both sides run one thread, so each run's CPU time is its work without the time it
spent descheduled; the "cpu ratio" column compares those and is steadier than the
wall-clock ratio when other processes share the cores (on a quiet machine the two agree).

    python benchmarks/engine.py [--reps 5] [--batch 16] [--max-tokens 64] [--model-dir DIR]
                                [--max-num-batched-tokens N] [--row-major-weights]

``--max-num-batched-tokens`` sets pdserve's per-step token budget (the engine's
default, 512, keeps colocated decode steps short; a larger budget prefills in
fewer, larger steps; transformers prefills the whole padded batch at once).
``--row-major-weights`` also times pdserve with its projection weights in nn.Linear's usual
row-major layout (what ``LlamaModel.use_column_major_weights`` changes), interleaved with runs
in the column-major layout the engine uses on CPU (in both, the logits of 2-64 rows go through the
packed LM head kernel where it is built: see ``workers.engine.lm_head``).
The line under the table says which LM head path pdserve took; ``PDSERVE_ENGINE_PURE=1`` runs
without the kernel.
The load average is printed: other processes on the cores, and their memory traffic, shift both
columns; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _time_pair(
    first: Callable[[], int], second: Callable[[], int], reps: int
) -> tuple[tuple[float, float], tuple[float, float], int, int]:
    """Median (wall, CPU) seconds of two runners over ``reps`` interleaved runs (after a warm-up of each).

    Interleaving makes both sides see the same background load on a shared machine.
    """
    tokens = (first(), second())
    wall: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for i, fn in enumerate((first, second)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    medians = [(statistics.median(wall[i]), statistics.median(cpu[i])) for i in range(2)]
    return medians[0], medians[1], tokens[0], tokens[1]


def _load_average() -> str:
    """The machine's load averages, to judge how much other work shared the cores."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _linear_weights(engine: Any) -> dict[Any, Any]:
    """Every projection module of the engine's model with its current weight."""
    from torch import nn

    return {m: m.weight for m in engine.model.modules() if isinstance(m, nn.Linear)}


def main() -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per case (median is shown)")
    parser.add_argument("--batch", type=int, default=16, help="prompts in the mixed batch")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--single-prompt-tokens", type=int, default=128, help="prompt length at batch 1")
    parser.add_argument("--min-prompt", type=int, default=16, help="shortest prompt of the mixed batch")
    parser.add_argument("--max-prompt", type=int, default=512, help="longest prompt of the mixed batch")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="model to use (default: a fresh tiny Llama)"
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="pdserve's per-step token budget (default: the engine's default)",
    )
    parser.add_argument(
        "--row-major-weights", action="store_true",
        help="also time pdserve with row-major projection weights (nn.Linear's usual layout) "
             "and print column-major / row-major",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from workers.engine import lm_head
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams
    from workers.engine.tiny import create_tiny_model

    scratch = None if args.model_dir else tempfile.TemporaryDirectory(prefix="pdserve-bench-")
    model_dir = args.model_dir or create_tiny_model(Path(scratch.name if scratch else "."))
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    budget = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    engine_config = EngineConfig(kv_cache_bytes=512 * 1024 * 1024, **budget)
    engine = LLMEngine(model_dir, engine_config)
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    single = [[rng.randrange(10, vocab) for _ in range(args.single_prompt_tokens)]]
    mixed_lens = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.batch)]
    mixed = [[rng.randrange(10, vocab) for _ in range(n)] for n in mixed_lens]
    same_out = [args.max_tokens] * args.batch
    # Requests asking for different lengths: transformers' batch runs until the longest is done.
    mixed_out = [rng.randint(max(1, args.max_tokens // 8), args.max_tokens) for _ in range(args.batch)]

    def run_pdserve(prompts: list[list[int]], out_lens: list[int]) -> Callable[[], int]:
        def go() -> int:
            for i, (prompt, n) in enumerate(zip(prompts, out_lens, strict=True)):
                engine.add_request(f"bench-{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True))
            tokens = 0
            while engine.has_unfinished():
                tokens += sum(len(o.new_token_ids) for o in engine.step())
            return tokens

        return go

    def run_transformers(prompts: list[list[int]], out_lens: list[int]) -> Callable[[], int]:
        width = max(len(p) for p in prompts)
        pad = 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        longest = max(out_lens)

        def go() -> int:
            with torch.no_grad():
                out = hf.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=longest,
                    min_new_tokens=longest,
                    do_sample=False,
                    pad_token_id=pad,
                )
            assert out.shape[1] - width == longest
            return sum(out_lens)  # only the tokens each request asked for are useful

        return go

    cases = [
        ("batch 1", single, [args.max_tokens]),
        (f"batch {args.batch} mixed prompts", mixed, same_out),
        (f"batch {args.batch} mixed prompts+outputs", mixed, mixed_out),
    ]
    rows = []
    load_before = _load_average()
    for name, prompts, out_lens in cases:
        hf_run, pd_run = run_transformers(prompts, out_lens), run_pdserve(prompts, out_lens)
        (hf_s, hf_cpu), (pd_s, pd_cpu), hf_tokens, pd_tokens = _time_pair(hf_run, pd_run, args.reps)
        assert hf_tokens == pd_tokens, (hf_tokens, pd_tokens)
        rows.append((name, pd_tokens, hf_tokens / hf_s, pd_tokens / pd_s, hf_cpu / pd_cpu))

    layout_rows = []
    if args.row_major_weights:
        column_major = _linear_weights(engine)
        row_major = {m: torch.nn.Parameter(w.detach().contiguous(), requires_grad=False)
                     for m, w in column_major.items()}

        def with_weights(weights: dict[torch.nn.Linear, torch.nn.Parameter],
                         run: Callable[[], int]) -> Callable[[], int]:
            def go() -> int:
                for module, weight in weights.items():
                    module.weight = weight
                return run()

            return go

        for name, prompts, out_lens in cases:
            run = run_pdserve(prompts, out_lens)
            (_, row_cpu), (_, col_cpu), _, _ = _time_pair(
                with_weights(row_major, run), with_weights(column_major, run), args.reps
            )
            layout_rows.append((name, row_cpu / col_cpu))
        for module, weight in column_major.items():
            module.weight = weight

    print(f"load average (1, 5, 15 min): before {load_before}, after {_load_average()}")
    print(f"model: {model_dir}  (torch threads: {torch.get_num_threads()}, reps: {args.reps}, median, "
          f"pdserve token budget {engine_config.max_num_batched_tokens})")
    head = engine.model.packed_head
    head_path = (f"packed kernel, {lm_head.KERNEL_STATE}, {head.nbytes >> 20} MiB copy" if head is not None
                 else f"torch matmul (kernel {lm_head.KERNEL_STATE})")
    print(f"pdserve LM head: {head_path}")
    print(f"mixed prompt lengths: {sorted(mixed_lens)}")
    print(f"output lengths: {args.max_tokens} each, or mixed: {sorted(mixed_out)}")
    header = f"{'case':<36}{'tokens':>8}{'transformers tok/s':>21}{'pdserve tok/s':>16}{'ratio':>8}"
    print(header + f"{'cpu ratio':>11}")
    for name, tokens, hf_tps, pd_tps, cpu_ratio in rows:
        print(
            f"{name:<36}{tokens:>8}{hf_tps:>21.1f}{pd_tps:>16.1f}{pd_tps / hf_tps:>7.2f}x{cpu_ratio:>10.2f}x"
        )
    for name, speedup in layout_rows:
        print(f"{name:<36} pdserve column-major / row-major weights (cpu): {speedup:.2f}x")
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
