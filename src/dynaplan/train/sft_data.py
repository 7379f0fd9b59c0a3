"""The SFT dataset: validated step records -> prompt-completion examples, split by episode.

The prompt is the one the agent sees at evaluation and PPO time (the shared prompt builder, via
the stored `messages` for the dynamic variant and the plan-stripped `naive_view` for the naive
one). It must not tokenize, train or decide anything about models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VARIANTS: tuple[str, ...] = ("dynamic", "naive")


class SftInputError(ValueError):
    """Bad SFT input (dataset missing or unvalidated, base model or adapter mismatch, an example
    longer than allowed), found before training starts. The message says what to fix. Exit 2."""


@dataclass(frozen=True)
class SftExample:
    """One teacher step as a prompt-completion pair, with what the held-out metrics compare to."""

    prompt: list[dict[str, str]]  # system + user messages (the chat template is applied by TRL)
    completion: str  # the teacher's answer in the output protocol
    episode_id: str
    env: str
    step: int
    action: str  # the teacher's action
    planned: bool  # the teacher wrote a plan at this step (in the naive view too, where it is cut)

    def as_record(self) -> dict:
        """TRL's conversational prompt-completion format."""
        return {"prompt": self.prompt, "completion": [{"role": "assistant", "content": self.completion}]}


def check_validated(report_path: str | Path) -> dict:
    """The validate stage's report, or SftInputError if it is missing or says the data failed."""
    report_path = Path(report_path)
    if not report_path.is_file():
        raise SftInputError(
            f"validation report not found: {report_path}; run `dvc repro validate` before training "
            "(SFT trains only on data that passed the Great Expectations gate)"
        )
    try:
        report = json.loads(report_path.read_text())
    except json.JSONDecodeError as err:
        raise SftInputError(f"validation report {report_path} is not valid JSON: {err}") from None
    if report.get("success") is not True:
        failed = report.get("failed") or report.get("failures") or "see the report"
        raise SftInputError(
            f"the dataset failed validation ({report_path}: success={report.get('success')!r}; {failed}); "
            "fix the data and re-run `dvc repro validate`"
        )
    return report


def read_rows(data_dir: str | Path, envs: Sequence[str]) -> list[dict]:
    """The step records of `envs`, in dataset order (shard name, then row)."""
    from dynaplan.data.dataset import read_table

    try:
        table = read_table(data_dir)
    except FileNotFoundError as err:
        raise SftInputError(f"{err}; run `dvc repro generate validate` first") from None
    rows = [row for row in table.to_pylist() if row["env"] in set(envs)]
    if not rows:
        raise SftInputError(f"{data_dir} holds no steps of the envs {list(envs)} (params sft.envs)")
    return rows


def build_examples(
    rows: Sequence[dict],
    variant: str,
    *,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> list[SftExample]:
    """Step records as examples of `variant`. `dynamic`: the stored prompt (dynamic-planning
    instruction, the teacher's current plan) and the teacher's answer, plans included. `naive`:
    the plan-stripped view (`naive_view`: mode "never", no current plan, the bare action), built
    from the same observation and history window, under the same prompt token budget."""
    views = list(rows)
    if variant == "naive":
        from dynaplan.data.generation import naive_view

        views = naive_view(views, max_prompt_tokens=max_prompt_tokens, count_tokens=count_tokens).to_pylist()
    elif variant != "dynamic":
        raise ValueError(f"unknown SFT variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return [
        SftExample(
            prompt=json.loads(view["messages"]),
            completion=view["target"],
            episode_id=row["episode_id"],
            env=row["env"],
            step=int(row["step"]),
            action=row["action"],
            planned=bool(row["planned"]),  # the teacher's decision, also for the naive view
        )
        for row, view in zip(rows, views)
    ]


def split_by_episode(
    rows: Sequence[dict], eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows: whole episodes, at least one held out per env with 2+ episodes,
    chosen by a seeded permutation (so both variants hold out the same episodes)."""
    by_env: dict[str, list[str]] = {}
    for row in rows:
        episodes = by_env.setdefault(row["env"], [])
        if not episodes or episodes[-1] != row["episode_id"]:
            if row["episode_id"] not in episodes:
                episodes.append(row["episode_id"])
    rng = np.random.default_rng(seed)
    held_out: set[str] = set()
    for env in sorted(by_env):
        episodes = sorted(by_env[env])
        if len(episodes) < 2:
            raise SftInputError(f"env {env}: {len(episodes)} episode(s); SFT needs 2+ to hold some out")
        count = min(len(episodes) - 1, max(1, math.ceil(eval_fraction * len(episodes))))
        held_out.update(episodes[i] for i in rng.permutation(len(episodes))[:count])
    train = [row for row in rows if row["episode_id"] not in held_out]
    heldout = [row for row in rows if row["episode_id"] in held_out]
    return train, heldout


def sample_rows(rows: Sequence[dict], count: int, seed: int) -> list[dict]:
    """A seeded sample of `count` rows (all of them when there are fewer), in dataset order."""
    if len(rows) <= count:
        return list(rows)
    index = sorted(np.random.default_rng(seed).choice(len(rows), size=count, replace=False).tolist())
    return [rows[i] for i in index]


def sample_rows_by_plan(rows: Sequence[dict], count: int, seed: int, plan_share: float) -> list[dict]:
    """A seeded sample of `count` rows, stratified: each env gets its share of `count` (largest
    remainder), of which `plan_share` are rows where the teacher planned (as many as there are;
    the other class fills the rest). All rows when there are no more than `count`. Dataset order."""
    if len(rows) <= count:
        return list(rows)
    rng = np.random.default_rng(seed)
    envs = sorted({row["env"] for row in rows})
    index_of = {env: [i for i, row in enumerate(rows) if row["env"] == env] for env in envs}
    exact = {env: count * len(index_of[env]) / len(rows) for env in envs}
    quota = {env: int(exact[env]) for env in envs}
    for env in sorted(envs, key=lambda e: (-(exact[e] - quota[e]), e))[: count - sum(quota.values())]:
        quota[env] += 1
    chosen: list[int] = []
    for env in envs:
        planned = [i for i in index_of[env] if rows[i]["planned"]]
        acting = [i for i in index_of[env] if not rows[i]["planned"]]
        n_plan = min(len(planned), round(quota[env] * plan_share))
        n_plan = max(n_plan, quota[env] - len(acting))  # too few acting rows: more planned ones
        for pool, n in ((planned, n_plan), (acting, quota[env] - n_plan)):
            chosen.extend(pool[j] for j in rng.choice(len(pool), size=n, replace=False).tolist())
    return [rows[i] for i in sorted(chosen)]


def sample_train_rows(pool: Sequence[dict], count: int, seed: int, plan_share: float) -> list[dict]:
    """The stage's training sample of `pool`: stratified by plan (`sample_rows_by_plan`) when
    sft.plan_share > 0, else a plain seeded sample (`sample_rows`)."""
    if plan_share > 0:
        return sample_rows_by_plan(pool, count, seed, plan_share)
    return sample_rows(pool, count, seed)


def decision_weights(pool: Sequence[dict], sample: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """Per env, (weight of a planned step, weight of an acting step) on the answer's first token,
    the decision to open a plan: the importance weights that take the sample's plan rate back to
    the pool's (the teacher's), so that the weighted loss's fixed point for P(open a plan) is the
    teacher's rate however the sample was stratified. (1, 1) for an env sampled at its own rate."""
    weights = {}
    for env in sorted({row["env"] for row in sample}):
        teacher = float(np.mean([row["planned"] for row in pool if row["env"] == env]))
        sampled = float(np.mean([row["planned"] for row in sample if row["env"] == env]))
        weights[env] = (teacher / sampled if sampled > 0 else 1.0, (1 - teacher) / (1 - sampled) if sampled < 1 else 1.0)
    return weights


def env_batches(
    examples: Sequence[SftExample],
    batch_size: int,
    seed: int,
    lengths: Sequence[int] | None = None,
    window: int = 8,
    balance_plans: bool = False,
    plan_tolerance: int = 0,
) -> list[SftExample]:
    """`examples` reordered so that consecutive runs of `batch_size` hold one env's steps (they
    share a system prompt), in a seeded random order of batches. Each env's steps are shuffled;
    with `lengths` (tokens per example), each run of `window` batches is sorted by length before
    it is cut, so a batch's rows need little padding (as transformers' LengthGroupedSampler
    does). With `balance_plans`, an env's plan steps (`planned`) and its other steps are
    shuffled apart and interleaved evenly, so every run of `window` batches holds the env's
    share of plan steps; each run is then sorted by length and cut into batches that hold
    their share of its plan steps (rounded) +- `plan_tolerance` (see `_balanced_cut`), rather
    than whatever the shuffle and the length sort give (0 to 5 of 8). The env's last rows that
    do not fill a batch join the other envs' in the last batches (the only ones that can mix
    envs). Then the full batches are shuffled. The same examples, lengths and seed give the
    same order."""
    rng = np.random.default_rng(seed)
    size = {id(ex): n for ex, n in zip(examples, lengths)} if lengths is not None else None

    def shuffled_runs(group: list[SftExample], span: int) -> list[SftExample]:
        group = [group[i] for i in rng.permutation(len(group))]
        if size is None:
            return group
        return [ex for i in range(0, len(group), span) for ex in sorted(group[i : i + span], key=lambda e: -size[id(e)])]

    flat: list[SftExample] = []
    tails: list[SftExample] = []  # balanced: each env's rows short of a full batch
    for env in sorted({ex.env for ex in examples}):
        group = [ex for ex in examples if ex.env == env]
        if not balance_plans:
            flat.extend(shuffled_runs(group, batch_size * window))
            continue
        plans = [ex for ex in group if ex.planned]
        acts = [ex for ex in group if not ex.planned]
        plans, acts = [plans[i] for i in rng.permutation(len(plans))], [acts[i] for i in rng.permutation(len(acts))]
        # position j is a plan step when the running quota of plan steps, j * share, crosses an integer
        n, n_plans = len(group), len(plans)
        next_plan, next_act = iter(plans).__next__, iter(acts).__next__
        even = [next_plan() if (j + 1) * n_plans // n > j * n_plans // n else next_act() for j in range(n)]
        whole = n // batch_size * batch_size
        for start in range(0, whole, batch_size * window):
            run = even[start : min(start + batch_size * window, whole)]
            flat.extend(run if size is None else _balanced_cut(run, [size[id(ex)] for ex in run], batch_size, plan_tolerance))
        tails.extend(even[whole:])
    flat.extend(tails)
    full = len(flat) // batch_size
    batches = [flat[i * batch_size : (i + 1) * batch_size] for i in range(full)]
    # A short last batch stays last: anywhere else it would shift every batch after it.
    return [ex for b in rng.permutation(full) for ex in batches[b]] + flat[full * batch_size :]


def _balanced_cut(run: Sequence[SftExample], lengths: Sequence[int], batch_size: int, tolerance: int) -> list[SftExample]:
    """`run` (whole batches of one env) sorted by length, longest first, and cut into batches
    in that order, each holding between floor(share x batch) - `tolerance` and ceil(share x
    batch) + `tolerance` plan steps, `share` being the run's: a batch takes the plan steps among
    the next `batch_size` rows when their count is in range, else the next plan steps or other
    steps in length order instead, within what still leaves the later batches in range. At
    tolerance 0 every batch holds the run's share; at 1 the rows of a batch differ less in length
    (less padding), the plan decision's pull varying by one plan step a batch."""
    order = sorted(range(len(run)), key=lambda i: -lengths[i])  # stable: ties keep the shuffle
    batches = len(run) // batch_size
    plans_left = sum(run[i].planned for i in order)
    share = plans_left / len(run)
    lo = max(0, math.floor(share * batch_size) - tolerance)
    hi = min(batch_size, math.ceil(share * batch_size) + tolerance)
    out: list[SftExample] = []
    for b in range(batches):
        rest = batches - b - 1
        # in range, and the rest of the run's plan steps still fit the later batches' ranges
        low, high = max(lo, plans_left - hi * rest), min(hi, plans_left - lo * rest)
        take = min(max(sum(run[i].planned for i in order[:batch_size]), low), high)
        plans = [i for i in order if run[i].planned][:take]
        acts = [i for i in order if not run[i].planned][: batch_size - take]
        chosen = set(plans + acts)
        out.extend(run[i] for i in order if i in chosen)
        order = [i for i in order if i not in chosen]
        plans_left -= take
    return out
