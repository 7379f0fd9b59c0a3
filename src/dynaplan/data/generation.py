"""Teacher rollouts to step records: shards of episodes, generated in parallel and resumably.

Each shard is a pure function of its spec (env settings, seeds, teacher settings, prompt
settings, tokenizer, the generating code), written atomically under a name that carries the spec
hash, so a killed run keeps its finished shards and a changed spec never reuses a stale one.
The plan-stripped "naive" view is `naive_view`, computed from a dataset, never stored.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import dynaplan
from dynaplan.agent.prompts import Turn, build_messages, planning_instruction
from dynaplan.agent.protocol import format_output
from dynaplan.config import Params
from dynaplan.data import dataset
from dynaplan.data.schema import COLUMNS, to_table

GENERATION_MODE = "dynamic"
NAIVE_MODE = "never"
VARIANT_DYNAMIC = "dynamic"
VARIANT_NAIVE = "naive"
ENV_ORDER = ("crafter", "pogs")  # crafter first: its long episodes should start early
TEACHER_NAMES = {"crafter": "crafter_expert", "pogs": "pogs_expert"}
# The code a shard's content depends on: a change here makes every shard's spec (and name) new.
_CODE_PATHS = ("envs", "teachers", "agent", "data/generation.py", "data/schema.py", "data/dataset.py")


@dataclass(frozen=True)
class GenerationSettings:
    """Everything a worker needs, picklable; one per dataset."""

    env_kwargs: dict[str, dict[str, Any]]
    teacher_seed: int
    plan_interval_min: int
    plan_interval_max: int
    history_len: int
    max_prompt_tokens: int
    tokenizer_dir: str
    code_hash: str = ""
    tokenizer_hash: str = ""
    # per env, keyword settings of its teacher beyond seed and plan interval (absent: none)
    teacher_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def spec(self, env: str) -> dict[str, Any]:
        spec = asdict(self)
        spec["env_kwargs"] = self.env_kwargs[env]
        spec["teacher_kwargs"] = self.teacher_kwargs.get(env, {})
        spec.pop("tokenizer_dir")  # where the tokenizer sits does not change the data
        return spec


@dataclass(frozen=True)
class ShardJob:
    env: str
    index: int
    seeds: tuple[int, ...]
    spec_hash: str = field(default="", compare=False)

    @property
    def logical_name(self) -> str:
        return f"{self.env}-{self.index:05d}"

    @property
    def file_name(self) -> str:
        return f"{self.logical_name}-{self.spec_hash[:12]}{dataset.SHARD_SUFFIX}"


def train_seeds(params: Params, env: str) -> list[int]:
    """Env seeds of the teacher episodes: consecutive from seeds.train_start (config.py checks
    that they stay clear of the evaluation seeds from seeds.eval_start)."""
    count = params.generate.crafter_episodes if env == "crafter" else params.generate.pogs_episodes
    return [params.seeds.train_start + i for i in range(count)]


def settings_from_params(params: Params, tokenizer_dir: str | Path | None = None) -> GenerationSettings:
    gen = params.generate
    crafter = params.envs.crafter.model_dump(mode="json")
    # Teacher episodes are short (generate.crafter_max_steps); the env cap stays the smaller one.
    crafter["max_steps"] = min(crafter["max_steps"], gen.crafter_max_steps)
    tokenizer_dir = str(tokenizer_dir or params.model.dir)
    return GenerationSettings(
        env_kwargs={"crafter": crafter, "pogs": params.envs.pogs.model_dump(mode="json")},
        teacher_seed=gen.seed,
        plan_interval_min=gen.plan_interval_min,
        plan_interval_max=gen.plan_interval_max,
        history_len=params.prompt.history_len,
        max_prompt_tokens=params.prompt.max_prompt_tokens,
        tokenizer_dir=tokenizer_dir,
        code_hash=code_hash(),
        tokenizer_hash=tokenizer_hash(tokenizer_dir),
        # empty: the Crafter teacher's default, every wording
        teacher_kwargs={"crafter": {"plan_styles": list(gen.crafter_plan_styles)}} if gen.crafter_plan_styles else {},
    )


def code_hash() -> str:
    package = Path(dynaplan.__file__).parent
    files: list[Path] = []
    for rel in _CODE_PATHS:
        target = package / rel
        files.extend(sorted(target.rglob("*.py")) if target.is_dir() else [target])
    return _sha256_json([[f.relative_to(package).as_posix(), f.read_text()] for f in files if f.is_file()])


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    folder = Path(tokenizer_dir)
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
    return _sha256_json([[n, dataset.file_sha256(folder / n)] for n in names if (folder / n).is_file()])


def _sha256_json(data: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def plan_shards(params: Params, settings: GenerationSettings) -> list[ShardJob]:
    per_shard = params.generate.episodes_per_shard
    jobs: list[ShardJob] = []
    for env in ENV_ORDER:
        seeds = train_seeds(params, env)
        for index, start in enumerate(range(0, len(seeds), per_shard)):
            chunk = tuple(seeds[start : start + per_shard])
            spec_hash = _sha256_json({"shard": [env, index, list(chunk)], **settings.spec(env)})
            jobs.append(ShardJob(env, index, chunk, spec_hash))
    return jobs


def teacher_seed(base_seed: int, env: str, env_seed: int) -> int:
    """A teacher's RNG seed, independent across envs and episodes, fixed by the params."""
    entropy = [base_seed & 0xFFFFFFFF, ENV_ORDER.index(env), env_seed]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@lru_cache(maxsize=4)
def token_counter(tokenizer_dir: str) -> Callable[[str], int]:
    """Token count of a text under the model's tokenizer (no special tokens).

    Uses the `tokenizers` library on `tokenizer.json`, the same fast tokenizer transformers
    wraps, because importing transformers (and torch) costs each worker process many seconds.
    """
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: model.dir must hold a fast tokenizer (run the base_model stage)")
    tokenizer = Tokenizer.from_file(str(path))

    @lru_cache(maxsize=4096)
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return count


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def rollout_episode(env_name: str, env_seed: int, settings: GenerationSettings) -> list[dict[str, Any]]:
    """One teacher episode as step records (prompt built with the shared builder, mode dynamic)."""
    from dynaplan.envs import make_env
    from dynaplan.teachers import make_teacher

    count_tokens = token_counter(settings.tokenizer_dir)
    env = make_env(env_name, **settings.env_kwargs[env_name])
    teacher = make_teacher(
        env_name,
        seed=teacher_seed(settings.teacher_seed, env_name, env_seed),
        plan_interval_min=settings.plan_interval_min,
        plan_interval_max=settings.plan_interval_max,
        **settings.teacher_kwargs.get(env_name, {}),
    )
    observation, info = env.reset(seed=env_seed)
    teacher.reset(observation, info)
    history: list[Turn] = []
    current_plan: str | None = None
    plan_interval: int | None = None
    rows: list[dict[str, Any]] = []
    step = 0
    while True:
        decision = teacher.act(observation, info)
        if decision.plan_interval is not None:
            plan_interval = decision.plan_interval
        if plan_interval is None:
            raise RuntimeError(f"{env_name} teacher wrote no plan at step {step} of seed {env_seed}: no plan interval")
        window = history[-settings.history_len :] if settings.history_len else []
        messages = build_messages(
            rules=env.rules,
            mode=GENERATION_MODE,
            observation=observation,
            history=window,
            current_plan=current_plan,
            history_len=settings.history_len,
            max_tokens=settings.max_prompt_tokens,
            count_tokens=count_tokens,
        )
        plan = decision.plan.strip() if decision.plan is not None else None
        next_observation, reward, terminated, truncated, next_info = env.step(decision.action)
        rows.append(
            {
                "episode_id": f"{env_name}-{env_seed:08d}",
                "env": env_name,
                "seed": env_seed,
                "step": step,
                "messages": _canonical(messages),
                "target": format_output(decision.action, plan),
                "action": decision.action,
                "planned": plan is not None,
                "plan_text": plan,
                "plan_tokens": count_tokens(plan) if plan is not None else 0,
                "reward": float(reward),
                "terminated": bool(terminated),
                "truncated": bool(truncated),
                "achievements": _canonical(next_info.get("achievements", {})),
                "teacher": TEACHER_NAMES[env_name],
                "plan_interval": plan_interval,
                "variant": VARIANT_DYNAMIC,
                "observation": observation,
                "history": _canonical([[t.observation, t.action] for t in window]),
                "current_plan": current_plan,
                "feedback": None,
            }
        )
        history.append(Turn(info["history_text"], decision.action))
        if plan is not None:
            current_plan = plan
        observation, info = next_observation, next_info
        step += 1
        if terminated or truncated:
            return rows


# Set in each pool worker by _init_worker: where to report finished episodes.
_progress_queue: Any = None


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


def generate_shard(job: ShardJob, settings: GenerationSettings, out_dir: str, report: Callable | None = None) -> dict:
    """Roll out a shard's episodes and write it atomically; returns its manifest entry."""
    report = report or (_progress_queue.put if _progress_queue is not None else None)
    rows: list[dict[str, Any]] = []
    for env_seed in job.seeds:
        episode = rollout_episode(job.env, env_seed, settings)
        rows.extend(episode)
        if report is not None:
            report((job.env, len(episode)))
    rows.sort(key=lambda r: (r["episode_id"], r["step"]))
    path = dataset.write_shard(to_table(rows), Path(out_dir) / job.file_name)
    return _shard_entry(job, path)


def _shard_entry(job: ShardJob, path: Path) -> dict:
    """A shard's manifest entry, read back from the file (so kept and new shards agree)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    planned = pq.read_table(path, columns=["planned"])["planned"]
    return {
        "name": job.logical_name,
        "file": path.name,
        "env": job.env,
        "episodes": len(job.seeds),
        "rows": len(planned),
        "planned": int(pc.sum(planned).as_py() or 0),
        "sha256": dataset.file_sha256(path),
    }


@dataclass
class GenerationResult:
    manifest: dict
    generated_shards: int
    reused_shards: int
    steps_generated: int
    seconds: float

    @property
    def steps_per_second(self) -> float:
        return self.steps_generated / self.seconds if self.seconds > 0 else 0.0


def generate_dataset(
    params: Params,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Generate every missing shard of the teacher dataset into `out_dir`, then its manifest.

    Shards already on disk under their spec name are kept (resume); files of other specs are
    removed at the end. `workers` > 1 runs shards in spawned processes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_from_params(params, tokenizer_dir)
    if not Path(settings.tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {settings.tokenizer_dir} not found (run the base_model stage first)")
    jobs = plan_shards(params, settings)
    workers = workers or params.generate.workers
    entries: dict[str, dict] = {}
    todo: list[ShardJob] = []
    for job in jobs:
        path = out_dir / job.file_name
        if path.is_file():
            entries[job.logical_name] = _shard_entry(job, path)
        else:
            todo.append(job)
    total_episodes = sum(len(j.seeds) for j in todo)
    started = time.perf_counter()
    steps = 0
    with Progress(
        TextColumn("[bold]generate[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("episodes, {task.fields[steps]} steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task(f"{len(todo)} shards ({len(entries)} kept)", total=total_episodes, steps=0)

        def on_episode(event: tuple[str, int]) -> None:
            nonlocal steps
            steps += event[1]
            bar.update(task, advance=1, steps=steps)

        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                entries[job.logical_name] = generate_shard(job, settings, str(out_dir), report=on_episode)
        else:
            context = _worker_context()
            queue = context.Queue()
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(queue,)) as pool:
                pending = {pool.submit(generate_shard, job, settings, str(out_dir)) for job in todo}
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(queue, on_episode)
                    for future in done:
                        entry = future.result()
                        entries[entry["name"]] = entry
                _drain(queue, on_episode)
    seconds = time.perf_counter() - started
    expected = {job.file_name for job in jobs}
    for stale in out_dir.iterdir():
        # Shards of another spec (changed params or code) and temp files of a killed run.
        if stale.is_file() and stale.name not in expected and stale.name != dataset.MANIFEST:
            stale.unlink()
    manifest = build_manifest([entries[job.logical_name] for job in jobs], params)
    dataset.write_json_atomic(manifest, out_dir / dataset.MANIFEST)
    return GenerationResult(manifest, len(todo), len(jobs) - len(todo), steps, seconds)


# Imported once by the fork server, so each worker starts by forking a warm, thread-free
# process instead of importing the envs and teachers again (seconds per worker on 2 cores).
# Plain fork is not used: the parent may already run tokenizer and Arrow threads.
_WORKER_PRELOAD = [
    "dynaplan.data.generation", "dynaplan.envs.crafter_text", "dynaplan.envs.pogs",
    "dynaplan.teachers.crafter_expert", "dynaplan.teachers.pogs_expert", "tokenizers",
]


def _worker_context():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_WORKER_PRELOAD)
    return context


def _drain(queue: Any, callback: Callable) -> None:
    import queue as queue_module

    while True:
        try:
            callback(queue.get_nowait())
        except queue_module.Empty:
            return


def episode_table(out_dir: str | Path) -> list[dict[str, Any]]:
    """Per-episode rows for the stage's plot: steps, plans, return (in episode-id order)."""
    import pyarrow.parquet as pq

    per_episode: dict[str, dict[str, Any]] = {}
    for path in dataset.shard_paths(out_dir):
        table = pq.read_table(path, columns=["episode_id", "env", "planned", "reward"]).to_pylist()
        for row in table:
            entry = per_episode.setdefault(row["episode_id"], {"env": row["env"], "steps": 0, "plans": 0, "return": 0.0})
            entry["steps"] += 1
            entry["plans"] += int(row["planned"])
            entry["return"] += row["reward"]
    return [
        {"episode": i, "episode_id": key, **value, "return": round(value["return"], 6)}
        for i, (key, value) in enumerate(sorted(per_episode.items()))
    ]


def build_manifest(entries: Sequence[dict], params: Params) -> dict:
    """The dataset's manifest: shards, counts per env and the digest (no timestamps)."""
    by_env: dict[str, dict[str, int]] = {}
    for entry in entries:
        counts = by_env.setdefault(entry["env"], {"episodes": 0, "rows": 0, "planned": 0})
        for key in counts:
            counts[key] += entry[key]
    rows = sum(e["rows"] for e in entries)
    return {
        "digest": dataset.dataset_digest([(e["name"], e["sha256"]) for e in entries]),
        "rows": rows,
        "plan_rate": round(sum(e["planned"] for e in entries) / rows, 6) if rows else 0.0,
        "episodes": sum(e["episodes"] for e in entries),
        "envs": by_env,
        "seeds": {"train_start": params.seeds.train_start, "eval_start": params.seeds.eval_start},
        "shards": list(entries),
    }


def naive_view(
    rows_or_table: pa.Table | Sequence[dict[str, Any]],
    *,
    history_len: int | None = None,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> pa.Table:
    """The plan-stripped "naive" view of a teacher dataset (for the Primed-Naive ablation).

    Each prompt is rebuilt with the shared builder in mode "never" from the stored observation
    and history, with no current plan; each target is the bare action; plan columns are cleared.
    The rules come back from the stored system message (the dynamic instruction is cut off).
    `history_len` defaults to the stored window.
    """
    rows = rows_or_table.to_pylist() if isinstance(rows_or_table, pa.Table) else [dict(r) for r in rows_or_table]
    suffix = "\n\n" + planning_instruction(GENERATION_MODE)
    out: list[dict[str, Any]] = []
    for row in rows:
        system = json.loads(row["messages"])[0]["content"]
        if not system.endswith(suffix):
            raise ValueError(f"row {row['episode_id']}:{row['step']}: system prompt is not a '{GENERATION_MODE}' prompt")
        rules = system[: -len(suffix)]
        history = [Turn(obs, act) for obs, act in json.loads(row["history"])]
        window_len = len(history) if history_len is None else history_len
        messages = build_messages(
            rules=rules,
            mode=NAIVE_MODE,
            observation=row["observation"],
            history=history,
            current_plan=None,
            history_len=window_len,
            feedback=row["feedback"],
            max_tokens=max_prompt_tokens,
            count_tokens=count_tokens,
        )
        out.append(
            {
                **row,
                "messages": _canonical(messages),
                "target": format_output(row["action"]),
                "planned": False,
                "plan_text": None,
                "plan_tokens": 0,
                "current_plan": None,
                "variant": VARIANT_NAIVE,
            }
        )
    return to_table([{c: r[c] for c in COLUMNS} for r in out])
