"""DVC stages `evaluate_*`, `goldilocks@*`, `best_of@*`: evaluate one policy on the held-out seeds
into reports/eval/<name>/ (metrics.json, episodes.csv, steps.jsonl, curve.csv, plots/).

Thin: parses which policy, reads params, calls dynaplan.eval.runner. Resumes finished episodes.
"""

from __future__ import annotations

import argparse
import sys

from dynaplan.config import EXIT_USAGE, ConfigError, load_params
from dynaplan.eval.runner import evaluate, spec_from_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate", description=__doc__)
    parser.add_argument("--name", required=True, help="evaluation name: the folder under reports/eval/")
    parser.add_argument("--policy", choices=["expert", "random", "model"], required=True)
    parser.add_argument("--env", choices=["crafter", "pogs"], default=None, help="default: evaluate.env")
    parser.add_argument("--model", default=None, help="model dir or models:/dynaplan-agent/<version|@alias>")
    parser.add_argument("--adapter", default=None, help="LoRA adapter dir on top of --model")
    parser.add_argument("--mode", choices=["dynamic", "every_k", "never", "always"], default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--plans", default=None, help="human plans file injected into the plan block")
    parser.add_argument("--best-of", type=int, default=None, help="attempts per seed (default 1)")
    parser.add_argument("--episodes", type=int, default=None, help="held-out seeds (default: evaluate.episodes or baseline_episodes)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="cap on steps per episode (default: evaluate.crafter_max_steps for LLM Crafter runs, else the env's own)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on answer tokens (default: evaluate.max_new_tokens)")
    args = parser.parse_args(argv)
    try:
        params = load_params()
        spec = spec_from_params(
            params, name=args.name, policy=args.policy, env=args.env, model=args.model, adapter=args.adapter,
            mode=args.mode, k=args.k, plans=args.plans, best_of=args.best_of, episodes=args.episodes,
            max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
        )
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    result, paths = evaluate(spec)
    m = result.metrics
    print(f"{spec.name}: progression {m['progression']:.3f} ± {m['progression_se']:.3f}, "
          f"tokens/episode {m['generated_tokens']:.0f}, {result.played} played, {result.resumed} resumed "
          f"-> {paths['metrics'].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
