"""Play the scripted Crafter expert on many seeds and print how far it gets, against the floors.

Prints per-achievement success rates, mean progression with its standard error, the Crafter score,
plans per episode, how episodes ended (and what killed the player), and the speed of expert + text
env next to raw `crafter.Env` measured in the same run. Usage:

    nice -n 10 .venv/bin/python benchmarks/crafter_expert.py --seeds 100 --workers 2
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from collections import Counter

import numpy as np

FLOORS = {
    "collect_wood": 1.00,
    "place_table": 0.95,
    "make_wood_pickaxe": 0.90,
    "collect_stone": 0.85,
    "make_stone_pickaxe": 0.75,
    "collect_coal": 0.70,
    "place_furnace": 0.50,
    "collect_iron": 0.30,
    "make_iron_pickaxe": 0.15,
    "collect_diamond": 0.05,
}
PROGRESSION_FLOOR = 0.40


def death_cause(env) -> str:
    """What killed the player, read from the world by the benchmark (never by the expert)."""
    world = env._env._world
    player = env._env._player
    x, y = (int(v) for v in player.pos)
    if world[(x, y)][0] == "lava":
        return "lava"
    near = []
    for obj in world.objects:
        if obj is player:
            continue
        dist = abs(int(obj.pos[0]) - x) + abs(int(obj.pos[1]) - y)
        name = type(obj).__name__.lower()
        if name == "zombie" and dist <= 1:
            near.append("zombie")
        if name == "arrow" and dist <= 2:
            near.append("arrow (skeleton)")
        if name == "skeleton" and dist <= 5:
            near.append("skeleton")
    if near:
        return near[0]
    inv = player.inventory
    starved = [name for name in ("food", "drink", "energy") if inv[name] <= 0]
    return "no " + "/".join(starved) if starved else "unknown"


def play(args: tuple[int, int]) -> dict:
    seed, max_steps = args
    from dynaplan.envs import make_env
    from dynaplan.teachers.crafter_expert import CrafterExpert

    env = make_env("crafter", max_steps=max_steps)
    expert = CrafterExpert(seed=seed)
    obs, info = env.reset(seed=seed)
    expert.reset(obs, info)
    plans = 0
    terminated = truncated = False
    start = time.perf_counter()
    steps = 0
    while not (terminated or truncated):
        step = expert.act(obs, info)
        plans += step.plan is not None
        obs, _, terminated, truncated, info = env.step(step.action)
        steps += 1
    elapsed = time.perf_counter() - start
    return {
        "seed": seed,
        "achievements": dict(info["achievements"]),
        "progression": info["progression"],
        "plans": plans,
        "steps": steps,
        "died": bool(terminated),
        "cause": death_cause(env) if terminated else None,
        "seconds": elapsed,
    }


def raw_speed(steps: int) -> float:
    """Steps/s of raw crafter.Env (pixels included, as crafter renders them) with random actions."""
    import crafter

    env = crafter.Env(seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, done, _ = env.step(int(rng.integers(17)))
        if done:
            env.reset()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds (0..N-1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=2000, help="episode cap")
    parser.add_argument("--workers", type=int, default=1, help="processes (the machine is shared: be modest)")
    parser.add_argument("--raw-steps", type=int, default=500, help="steps of raw crafter.Env for the speed ratio")
    args = parser.parse_args()
    if args.seeds < 1 or args.workers < 1 or args.max_steps < 1:
        parser.error("--seeds, --workers and --max-steps must be >= 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jobs = [(seed, args.max_steps) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    start = time.perf_counter()
    if args.workers == 1:
        results = [play(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(play, jobs, chunksize=1)
    wall = time.perf_counter() - start

    from dynaplan.envs.crafter_text import ACHIEVEMENTS

    n = len(results)
    print(f"Crafter expert on {n} seeds ({args.first_seed}..{args.first_seed + n - 1}), cap {args.max_steps} steps, {args.workers} workers, {wall:.0f} s wall")
    print(f"{'achievement':<22}{'success':>9}{'floor':>8}  {'mean first step':>15}")
    rates = {}
    for name in ACHIEVEMENTS:
        got = [r["achievements"][name] for r in results if name in r["achievements"]]
        rates[name] = len(got) / n
        floor = FLOORS.get(name)
        mark = "" if floor is None else ("  ok" if rates[name] >= floor else "  BELOW")
        floor_text = f"{floor:.0%}" if floor is not None else "-"
        first = f"{np.mean(got):.0f}" if got else "-"
        print(f"{name:<22}{rates[name]:>9.0%}{floor_text:>8}  {first:>15}{mark}")
    prog = np.array([r["progression"] for r in results])
    sem = prog.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    score = math.exp(np.mean([math.log(1 + 100 * s) for s in rates.values()])) - 1
    plans = np.array([r["plans"] for r in results])
    steps = np.array([r["steps"] for r in results])
    mark = "ok" if prog.mean() >= PROGRESSION_FLOOR else "BELOW"
    print(f"mean progression      {prog.mean():.3f} +- {sem:.3f} (floor {PROGRESSION_FLOOR}) {mark}")
    print(f"Crafter score         {score:.1f} %")
    print(f"plans per episode     {plans.mean():.1f} (steps per plan {steps.sum() / max(1, plans.sum()):.2f})")
    print(f"episode length        {steps.mean():.0f} steps on average")
    deaths = Counter(r["cause"] for r in results if r["died"])
    print(f"deaths                {sum(deaths.values())}/{n}: " + (", ".join(f"{c} {k}" for c, k in deaths.most_common()) or "none"))
    below = [k for k, f in FLOORS.items() if rates[k] < f] + (["progression"] if prog.mean() < PROGRESSION_FLOOR else [])
    print("floors                " + ("all met" if not below else "BELOW: " + ", ".join(below)))
    expert_env_speed = steps.sum() / sum(r["seconds"] for r in results)
    raw = raw_speed(args.raw_steps)
    print(f"speed                 expert+text env {expert_env_speed:.0f} steps/s per process, raw crafter.Env {raw:.0f} steps/s, ratio {expert_env_speed / raw:.2f} (floor 0.5; machine shared, noisy)")


if __name__ == "__main__":
    main()
