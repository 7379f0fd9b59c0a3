"""Play the POGS expert on hard episodes and print its success rate against the 95% floor, with
steps, invalid moves, backtracks, plans per episode and the number of distinct plan openings.

    nice -n 10 .venv/bin/python benchmarks/pogs_expert.py --episodes 200
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from dynaplan.envs.pogs import PogsEnv
from dynaplan.teachers import make_teacher

SUCCESS_FLOOR = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--num-nodes", type=int, default=20)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--min-backtracks", type=int, default=1)
    args = parser.parse_args()

    env = PogsEnv(num_nodes=args.num_nodes, k=args.k, hard=True, min_backtracks=args.min_backtracks)
    teacher = make_teacher("pogs", seed=args.first_seed)  # reads k off the observations
    reached, lengths, invalid, backtracks, plans, progression = [], [], [], [], [], []
    openings: set[str] = set()
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.episodes):
        obs, info = env.reset(seed=seed)
        teacher.reset(obs, info)
        episode_invalid = episode_plans = 0
        while True:
            step = teacher.act(obs, info)
            if step.plan is not None:
                episode_plans += 1
                openings.add(re.sub(r"\d+", "N", step.plan)[:30])
            obs, reward, terminated, truncated, info = env.step(step.action)
            episode_invalid += reward < 0
            if terminated or truncated:
                break
        reached.append(terminated)
        lengths.append(info["step"])
        invalid.append(episode_invalid)
        backtracks.append(teacher.explorer.backtracks)
        plans.append(episode_plans)
        progression.append(info["progression"])
    seconds = time.perf_counter() - start

    success = float(np.mean(reached))
    table = Table(title=f"POGS expert on {args.episodes} hard episodes (nodes={args.num_nodes}, k={args.k}, min_backtracks={args.min_backtracks})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("floor", justify="right")
    table.add_row("reached target", f"{success:.1%}", f"{SUCCESS_FLOOR:.0%} {'ok' if success >= SUCCESS_FLOOR else 'MISSED'}")
    table.add_row("mean progression", f"{np.mean(progression):.3f} ± {np.std(progression) / np.sqrt(len(progression)):.3f}", "")
    table.add_row("steps per episode", f"{np.mean(lengths):.1f} (max {max(lengths)})", "")
    table.add_row("invalid moves per episode", f"{np.mean(invalid):.2f}", "")
    table.add_row("backtracks per episode", f"{np.mean(backtracks):.2f} (min {min(backtracks)})", "")
    table.add_row("plans per episode", f"{np.mean(plans):.2f}", "")
    table.add_row("distinct plan openings", str(len(openings)), "")
    table.add_row("episodes per second", f"{args.episodes / seconds:.1f}", "")
    Console().print(table)


if __name__ == "__main__":
    main()
