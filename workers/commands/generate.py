"""`pdserve generate`: prefill in one local process, decode in another, KV over a chosen transport.

Creates the tiny random Llama once (in the cache directory), starts a decode
process and a prefill process, runs each prompt disaggregated, prints the
tokens, text and per-request transfer stats, and compares the tokens with
single-process generation ("match" / "MISMATCH"). Exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse

DEFAULT_PROMPTS = (
    "Hello!",
    "Please write a short poem about the sea, a list of three fruits, and the time in Tokyo.",
    "The key-value cache is stored in fixed-size blocks. " * 30,
)
TRANSPORTS = ("tcp", "shm", "torch_dist", "nixl")  # nixl: optional, needs the NIXL packages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument("--transport", choices=TRANSPORTS, default="tcp", help="KV transport between the two processes")
    parser.add_argument(
        "--prompt", action="append", default=None,
        help="prompt text (repeatable); default: three prompts of 2, 24 and 391 tokens (tiny model tokenizer)",
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per prompt (EOS is ignored)")
    parser.add_argument(
        "--cache-dir", default=None,
        help="where the tiny model is created once (default: $PDSERVE_CACHE or ~/.cache/pdserve)",
    )
    parser.add_argument(
        "--model-dir", default=None,
        help="serve this Hugging Face model directory instead of the tiny random Llama",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the single-process comparison")


def main(args: argparse.Namespace) -> int:
    """Run the prompts disaggregated and report tokens, stats and the comparison."""
    import time
    from pathlib import Path

    import torch

    from workers.engine.loader import load_tokenizer
    from workers.engine.sampling_params import SamplingParams
    from workers.engine.tiny import ensure_tiny_model
    from workers.kv.local_pair import LocalPair, PairRequest, reference_tokens

    if args.max_tokens < 1:
        print(f"--max-tokens must be >= 1, got {args.max_tokens}")
        return 2
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model_dir = Path(args.model_dir) if args.model_dir else ensure_tiny_model(args.cache_dir)
    if not (model_dir / "config.json").is_file():
        print(f"{model_dir} has no config.json: not a model directory")
        return 2
    tokenizer = load_tokenizer(model_dir)
    texts = args.prompt or list(DEFAULT_PROMPTS)
    prompts = [tuple(tokenizer.encode(text)) for text in texts]
    if any(not p for p in prompts):
        print("every prompt must encode to at least one token")
        return 2
    sampling = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    print(f"model {model_dir}; transport {args.transport}; {len(prompts)} prompt(s)")

    with LocalPair(model_dir, [args.transport]) as pair:
        # computed while the two processes start up
        expected = None if args.no_check else reference_tokens(model_dir, prompts, sampling)
        results = [pair.run(PairRequest(f"gen-{i}", p, sampling)) for i, p in enumerate(prompts)]

    all_match = True
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        rs, ss = result.recv_stats, result.send_stats
        print(f"\n[{result.request_id}] prompt {len(prompt)} tokens -> {list(result.token_ids)}")
        print(f"  text: {result.text!r}")
        print(
            f"  kv: {rs.num_bytes / 1e6:.3f} MB in {rs.num_layers} layers; "
            f"{rs.ms:.2f} ms first-to-last layer at receiver ({rs.gbps:.3f} GB/s); "
            f"sender wire time {ss.wire_s * 1e3:.2f} ms ({ss.wire_gbps:.3f} GB/s); "
            f"prefill+transfer {result.prefill_s * 1e3:.1f} ms, first decode step {result.first_decode_s * 1e3:.1f} ms"
        )
        if expected is not None:
            match = result.token_ids == expected[i]
            all_match &= match
            print("  match" if match else f"  MISMATCH: single-process tokens {list(expected[i])}")
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")
    return 0 if all_match else 1
