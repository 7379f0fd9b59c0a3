"""Benchmark: the whole agent loop (Crafter text envs + LLM policy + lockstep engine) on the
embedded model, measured side by side in one run. Prints:

1. agent steps/s with `--batch` envs stepped in lockstep (one batched generation per step) vs one
   env at a time (target >= 4x);
2. the batched loop's time per step vs pure generation of the same tokens: every backend call the
   loop made is replayed through `backend.generate` alone, with the same requests and seeds (so
   the same tokens), and the loop's extra time is the overhead (target <= 20%).

    nice -n 10 .venv/bin/python benchmarks/agent_loop.py [--model models/base] [--batch 16] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import time

from dynaplan.agent.policy import LLMPolicy
from dynaplan.envs import make_env
from dynaplan.models.base import GenerationRequest, SamplingParams
from dynaplan.models.hf import HFBackend
from dynaplan.train.rollout import run_episodes


class RecordingBackend:
    """Passes calls through to the real backend, keeping each call and the time spent in it."""

    def __init__(self, backend):
        self.backend = backend
        self.name = backend.name
        self.calls: list[tuple] = []
        self.seconds = 0.0
        self.tokens = 0

    def count_tokens(self, text):
        return self.backend.count_tokens(text)

    def generate(self, requests, sampling, seed):
        start = time.perf_counter()
        out = self.backend.generate(requests, sampling, seed)
        self.seconds += time.perf_counter() - start
        self.calls.append((list(requests), sampling, seed))
        self.tokens += sum(len(g.token_ids) for g in out)
        return out


def run_loop(backend, env, args, seeds, num_envs):
    recorder = RecordingBackend(backend)
    policy = LLMPolicy(
        recorder, action_names=env.action_names, default_action=env.default_action, rules=env.rules,
        mode=args.mode, k=args.k, history_len=args.history_len, max_prompt_tokens=args.max_prompt_tokens,
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens), seed=args.seed,
    )
    start = time.perf_counter()
    episodes = run_episodes(policy, "crafter", {}, seeds, num_envs=num_envs, max_steps=args.steps, progress=False)
    wall = time.perf_counter() - start
    return wall, sum(ep.length for ep in episodes), recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--batch", type=int, default=16, help="envs in lockstep for the batched run")
    parser.add_argument("--sequential-episodes", type=int, default=2, help="episodes played one env at a time")
    parser.add_argument("--steps", type=int, default=6, help="steps per episode")
    parser.add_argument("--mode", default="dynamic", choices=["dynamic", "every_k", "never", "always"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--history-len", type=int, default=2)
    parser.add_argument("--max-prompt-tokens", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-seed", type=int, default=1_000_000)
    args = parser.parse_args()

    backend = HFBackend(args.model)
    env = make_env("crafter")
    # One short call so that lazy initialisation is timed in neither run.
    backend.generate([GenerationRequest(messages=[{"role": "user", "content": "Hi"}])], SamplingParams(max_new_tokens=2), 0)
    seeds = list(range(args.first_seed, args.first_seed + args.batch))

    # One env at a time before and after the batched run, summed: on a shared machine whose load
    # drifts, this brackets the batched run instead of comparing it with one moment.
    first = run_loop(backend, env, args, seeds[: args.sequential_episodes], 1)
    backend.clear_prefix_cache()
    wall_b, steps_b, rec_b = run_loop(backend, env, args, seeds, args.batch)
    backend.clear_prefix_cache()
    second = run_loop(backend, env, args, seeds[: args.sequential_episodes], 1)
    wall_1, steps_1 = first[0] + second[0], first[1] + second[1]
    rec_1 = RecordingBackend(backend)
    rec_1.seconds, rec_1.tokens = first[2].seconds + second[2].seconds, first[2].tokens + second[2].tokens

    # Pure generation of the batched loop's tokens: the same calls, nothing else.
    backend.clear_prefix_cache()
    tokens = 0
    start = time.perf_counter()
    for requests, sampling, seed in rec_b.calls:
        tokens += sum(len(g.token_ids) for g in backend.generate(requests, sampling, seed))
    pure = time.perf_counter() - start

    sps_b, sps_1 = steps_b / wall_b, steps_1 / wall_1
    print(f"agent loop on {args.model}, Crafter, mode {args.mode}, {args.steps} steps per episode, "
          f"max_new_tokens {args.max_new_tokens}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'run':<28}{'steps':>7}{'wall s':>9}{'steps/s':>9}{'gen s':>9}{'new tokens':>12}")
    print(f"{f'{args.batch} envs in lockstep':<28}{steps_b:>7}{wall_b:>9.1f}{sps_b:>9.3f}{rec_b.seconds:>9.1f}{rec_b.tokens:>12}")
    print(f"{'1 env at a time':<28}{steps_1:>7}{wall_1:>9.1f}{sps_1:>9.3f}{rec_1.seconds:>9.1f}{rec_1.tokens:>12}")
    print(f"{'pure generation (replay)':<28}{steps_b:>7}{pure:>9.1f}{steps_b / pure:>9.3f}{pure:>9.1f}{tokens:>12}")
    print(f"batched vs one at a time: {sps_b / sps_1:.2f}x steps/s (target >= 4x)")
    same = "same tokens" if tokens == rec_b.tokens else f"token counts differ: {tokens} vs {rec_b.tokens}"
    print(f"loop overhead vs pure generation: {100 * (wall_b / pure - 1):+.1f}% per step "
          f"({wall_b / steps_b:.3f} s vs {pure / steps_b:.3f} s; {same}; target <= 20%)")
    # Paired, so immune to load drift: the loop's own time (envs, prompts, parsing) over the time
    # its generate calls took in the same run.
    print(f"loop overhead over its own generate calls (same run): {100 * (wall_b - rec_b.seconds) / rec_b.seconds:+.1f}% "
          f"({wall_b - rec_b.seconds:.1f} s outside generate of {wall_b:.1f} s)")


if __name__ == "__main__":
    main()
