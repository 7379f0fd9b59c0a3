"""Steps per second of raw `crafter.Env` (default settings) next to CrafterTextEnv, the text env
with pixel rendering switched back on, and the Crafter expert playing the text env; measured in one
run, interleaved seed by seed so machine load hits all of them alike. Resets are not timed (world
generation is the same work for all). Targets: text env >= 0.9x raw, expert + env >= 0.5x raw.

    nice -n 10 .venv/bin/python benchmarks/env_speed.py --seeds 3 --steps 1000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import crafter
import numpy as np
from rich.console import Console
from rich.table import Table

from dynaplan.envs.crafter_text import CrafterTextEnv


def time_raw(seed: int, steps: int) -> tuple[int, float]:
    env = crafter.Env(seed=seed)
    env.reset()
    rng = np.random.default_rng(seed)
    done_steps, seconds = 0, 0.0
    while done_steps < steps:
        action = int(rng.integers(17))
        start = time.perf_counter()
        _, _, done, _ = env.step(action)
        seconds += time.perf_counter() - start
        done_steps += 1
        if done:
            env.reset()
    return done_steps, seconds


def time_text(seed: int, steps: int, render_pixels: bool) -> tuple[int, float]:
    env = CrafterTextEnv(render_pixels=render_pixels)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    done_steps, seconds = 0, 0.0
    while done_steps < steps:
        action = int(rng.integers(17))
        start = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        seconds += time.perf_counter() - start
        done_steps += 1
        if terminated or truncated:
            env.reset(seed=seed + 1000 * done_steps)
    return done_steps, seconds


def time_expert(seed: int, steps: int) -> tuple[int, float] | None:
    try:
        from dynaplan.teachers import make_teacher

        teacher = make_teacher("crafter", seed=seed)
    except ImportError:
        return None
    env = CrafterTextEnv()
    obs, info = env.reset(seed=seed)
    teacher.reset(obs, info)
    done_steps, seconds = 0, 0.0
    while done_steps < steps:
        start = time.perf_counter()
        action = teacher.act(obs, info).action
        obs, _, terminated, truncated, info = env.step(action)
        seconds += time.perf_counter() - start
        done_steps += 1
        if terminated or truncated:
            obs, info = env.reset(seed=seed + 1000 * done_steps)
            teacher.reset(obs, info)
    return done_steps, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per seed and runner")
    args = parser.parse_args()

    runners: dict[str, Callable[[int, int], tuple[int, float] | None]] = {
        "raw crafter.Env": time_raw,
        "CrafterTextEnv": lambda seed, steps: time_text(seed, steps, render_pixels=False),
        "CrafterTextEnv, pixels on": lambda seed, steps: time_text(seed, steps, render_pixels=True),
        "CrafterExpert + CrafterTextEnv": time_expert,
    }
    totals = {name: [0, 0.0] for name in runners}
    for seed in range(args.seeds):
        for name, run in runners.items():
            result = run(seed, args.steps)
            if result is None:
                totals[name] = None
                continue
            totals[name][0] += result[0]
            totals[name][1] += result[1]

    raw_rate = totals["raw crafter.Env"][0] / totals["raw crafter.Env"][1]
    targets = {"CrafterTextEnv": 0.9, "CrafterExpert + CrafterTextEnv": 0.5}
    table = Table(title=f"Crafter steps/s, {args.seeds} seeds x {args.steps} steps each, interleaved")
    for column in ("runner", "steps", "steps/s", "vs raw", "target"):
        table.add_column(column, justify="left" if column == "runner" else "right")
    for name, total in totals.items():
        if total is None:
            table.add_row(name, "-", "-", "-", "the crafter expert is not installed")
            continue
        rate = total[0] / total[1]
        target = targets.get(name)
        verdict = "" if target is None else f">= {target}x {'ok' if rate / raw_rate >= target else 'MISSED'}"
        table.add_row(name, str(total[0]), f"{rate:,.0f}", f"{rate / raw_rate:.2f}x", verdict)
    Console().print(table)


if __name__ == "__main__":
    main()
