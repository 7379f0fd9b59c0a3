"""Benchmark: prefill with and without reusing the system prompt's KV cache (hf backend).

The system message (rules + planning instruction) is the same at every step, so its KV cache is
computed once and copied into each batch. Both runs prefill the same 16 agent-style prompts and
generate one token; the cache is warm for the reuse run (steady state in an episode). Prints
effective prefill tokens/s (all prompt tokens / time) both ways and the ratio.

    python benchmarks/prefix_cache.py [--model models/base] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from agent_prompts import load_or_build

from dynaplan.models.base import SamplingParams
from dynaplan.models.hf import HFBackend


def timed(backend: HFBackend, requests, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        backend.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=1), seed=0)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", default=None, help="JSON of prompts: read if it exists, else written")
    args = parser.parse_args()

    reuse = HFBackend(args.model, dtype=args.dtype, device=args.device, prefix_cache=True)
    plain = HFBackend.from_model(reuse.model, reuse.tokenizer, prefix_cache=False)
    requests = load_or_build(args.batch, args.requests)
    prompt_tokens = sum(len(reuse.prompt_token_ids(r)) for r in requests)
    system_tokens = len(reuse._encode(requests[0]).cache_key or ())
    reuse.generate(requests[:1], SamplingParams(temperature=0.0, max_new_tokens=1), seed=0)  # fills the cache

    t_plain = timed(plain, requests, args.repeats)
    t_reuse = timed(reuse, requests, args.repeats)
    print(f"model {args.model}, {len(requests)} Crafter prompts, {prompt_tokens} prompt tokens "
          f"({system_tokens} of each are the shared system prompt), best of {args.repeats}")
    print(f"{'prefill':<22}{'seconds':>10}{'prompt tokens/s':>17}")
    print(f"{'no KV reuse':<22}{t_plain:>10.2f}{prompt_tokens / t_plain:>17.1f}")
    print(f"{'system-prompt reuse':<22}{t_reuse:>10.2f}{prompt_tokens / t_reuse:>17.1f}")
    print(f"ratio with/without reuse: {t_plain / t_reuse:.2f}x")


if __name__ == "__main__":
    main()
