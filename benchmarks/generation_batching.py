"""Benchmark: batched vs one-at-a-time generation with the hf backend on the embedded model.

16 agent-style Crafter prompts (dynamic planning), sampled with the same per-answer seeds both
ways (so both runs generate the same tokens), measured side by side in one run. Prints tokens/s
and decisions/s for each and the ratio (target >= 4x).

    python benchmarks/generation_batching.py [--model models/base] [--batch 16] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import time

from agent_prompts import load_or_build

from dynaplan.models.base import SamplingParams
from dynaplan.models.hf import HFBackend, row_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", default=None, help="JSON of prompts: read if it exists, else written")
    args = parser.parse_args()

    backend = HFBackend(args.model, dtype=args.dtype, device=args.device)
    requests = load_or_build(args.batch, args.requests)
    sampling = SamplingParams(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens)
    seeds = [row_seed(args.seed, i) for i in range(len(requests))]
    backend.generate_with_seeds(requests[:2], SamplingParams(max_new_tokens=2), seeds[:2])  # warm-up

    start = time.perf_counter()
    batched = backend.generate_with_seeds(requests, sampling, seeds)
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    single = [backend.generate_with_seeds([r], sampling, [s])[0] for r, s in zip(requests, seeds)]
    t_single = time.perf_counter() - start

    tok_b = sum(len(g.token_ids) for g in batched)
    tok_s = sum(len(g.token_ids) for g in single)
    same = sum(a.token_ids == b.token_ids for a, b in zip(batched, single))
    prompt = sum(g.prompt_tokens for g in batched) / len(batched)
    print(f"model {args.model}, {len(requests)} Crafter prompts (mean {prompt:.0f} prompt tokens), "
          f"max_new_tokens={args.max_new_tokens}, T={args.temperature}")
    print(f"{'mode':<14}{'seconds':>10}{'gen tokens':>12}{'tokens/s':>10}{'decisions/s':>13}")
    print(f"{'batched':<14}{t_batched:>10.2f}{tok_b:>12}{tok_b / t_batched:>10.1f}{len(requests) / t_batched:>13.2f}")
    print(f"{'one at a time':<14}{t_single:>10.2f}{tok_s:>12}{tok_s / t_single:>10.1f}{len(requests) / t_single:>13.2f}")
    print(f"identical answers both ways: {same}/{len(requests)}")
    print(f"ratio batched/one-at-a-time: decisions/s {t_single / t_batched:.2f}x, "
          f"tokens/s {(tok_b / t_batched) / (tok_s / t_single):.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
