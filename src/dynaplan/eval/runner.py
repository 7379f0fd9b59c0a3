"""Evaluate one policy on held-out seeds: build it, run episodes through the lockstep engine,
persist every finished episode at once (so an interrupted run resumes), then score and write.

It must not step envs itself (train/rollout.py does) nor hold metric formulas (metrics.py does).
Outputs in `out_dir`: metrics.json, episodes.csv, steps.jsonl (one line per step), curve.csv
(mean cumulative progression, plans and tokens per step: the DVC plot source) and plots/*.png.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynaplan.eval import metrics as M

POLICY_KINDS = ("expert", "random", "model")
BACKEND_KINDS = ("hf", "openai", "vllm")
REGISTRY_PREFIX = "models:/"
# Info keys copied into each step line: what the viewer shows and what a reader checks.
_STEP_INFO_KEYS = ("inventory", "status", "current_node", "target_node")


@dataclass(frozen=True)
class EvalSpec:
    """Everything that determines an evaluation's episodes (and so its resume fingerprint)."""

    name: str
    env: str = "crafter"
    policy: str = "expert"  # expert | random | model
    model: str | None = None  # a model dir or models:/dynaplan-agent/<version or @alias>
    adapter: str | None = None  # a PEFT LoRA adapter dir on top of `model`
    backend: str = "hf"  # hf | openai | vllm
    base_url: str | None = None  # openai backend: the server
    mode: str = "dynamic"  # dynamic | every_k | never | always
    k: int = 4
    plans: str | None = None  # a human plans file (YAML) injected into the current-plan block
    episodes: int = 2  # held-out seeds
    best_of: int = 1  # attempts per seed
    seed_start: int = 1_000_000
    seed: int = 0  # policy seed (sampling, teacher plan intervals, random actions)
    num_envs: int = 16
    max_steps: int | None = None  # cap below the env's own (LLM Crafter episodes are short on CPU)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    history_len: int = 2
    max_prompt_tokens: int | None = 768
    dtype: str = "float32"
    tokenizer: str | None = None  # counts the expert's plan tokens like the LLM's (a model dir)
    env_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICY_KINDS:
            raise ValueError(f"policy must be one of {', '.join(POLICY_KINDS)}, got {self.policy!r}")
        if self.backend not in BACKEND_KINDS:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_KINDS)}, got {self.backend!r}")
        if self.policy == "model" and not self.model:
            raise ValueError("policy 'model' needs a model (a directory or models:/dynaplan-agent/<version|@alias>)")
        if self.plans is not None and self.policy != "model":
            raise ValueError(f"a plans file steers an LLM policy; policy {self.policy!r} cannot use it")
        for key in ("episodes", "best_of", "num_envs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed_start, self.seed_start + self.episodes))

    def attempt_seed(self, attempt: int) -> int:
        # Attempt 0 uses the configured seed itself, so a best-of-1 run is the plain evaluation.
        if attempt == 0:
            return self.seed
        return int(np.random.SeedSequence([self.seed, attempt]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Resumable episode store


class EpisodeStore:
    """Finished episodes as JSON lines; each append is one write of one whole line, then fsync.

    A crash can leave at most a torn last line, which `load` drops (that episode reruns).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> list[dict]:
        if not self.path.is_file():
            return []
        episodes, good_bytes = [], 0
        with self.path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    episodes.append(json.loads(raw))
                except json.JSONDecodeError:
                    break
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            os.truncate(self.path, good_bytes)  # drop the torn tail so appends stay line-aligned
        return episodes

    def append(self, episode: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(episode, sort_keys=True, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _dir_stamp(path: str | None) -> list:
    """Names, sizes and mtimes of a model/adapter dir: a changed checkpoint changes the fingerprint."""
    if not path or path.startswith(REGISTRY_PREFIX) or not Path(path).is_dir():
        return [path]
    return [path] + sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in Path(path).rglob("*") if p.is_file()
    )


def _code_digest() -> str:
    """A hash of the code that decides what happens in an episode (envs, teachers, agent,
    models, the rollout engine, this runner): changed code must not reuse old episodes."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in ("envs", "teachers", "agent", "models", "train/rollout.py", "eval/runner.py"):
        root = package / folder
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(spec: EvalSpec) -> str:
    """A hash of everything that decides the episodes (not `episodes`/`best_of`/`num_envs`,
    so a larger run reuses the finished episodes of a smaller one)."""
    fields = asdict(spec)
    for key in ("name", "episodes", "best_of", "num_envs"):
        fields.pop(key)
    fields["code"] = _code_digest()
    if spec.model and spec.model.startswith(REGISTRY_PREFIX):
        from dynaplan import tracking

        # An alias can move to another version: the episodes belong to the version it names now.
        fields["model_version"] = tracking.resolve_version(normalise_model_uri(spec.model))
    fields["model_stamp"] = _dir_stamp(spec.model)
    fields["adapter_stamp"] = _dir_stamp(spec.adapter)
    if spec.plans and Path(spec.plans).is_file():
        fields["plans_sha"] = hashlib.sha256(Path(spec.plans).read_bytes()).hexdigest()
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Policies


def normalise_model_uri(model: str) -> str:
    """`models:/dynaplan-agent/@champion` (as people write it) -> MLflow's `models:/dynaplan-agent@champion`."""
    return model.replace("/@", "@") if model.startswith(REGISTRY_PREFIX) else model


def resolve_model(model: str) -> tuple[str, str | None, dict]:
    """A model dir stays as it is; `models:/dynaplan-agent/<version>` or `...@<alias>` is
    resolved through the registry (dynaplan.tracking.load_agent) to (base dir, adapter dir,
    {"name", "version"})."""
    if not model.startswith(REGISTRY_PREFIX):
        if not Path(model).is_dir():
            raise FileNotFoundError(f"model directory not found: {model}")
        return model, None, {}
    from dynaplan import tracking

    uri = normalise_model_uri(model)
    base, adapter = tracking.load_agent(uri)
    name = uri.removeprefix(REGISTRY_PREFIX).split("@", 1)[0].split("/", 1)[0]
    return str(base), str(adapter), {"name": name, "version": tracking.resolve_version(uri)}


def _token_counter(tokenizer_dir: str | None) -> Callable[[str], int] | None:
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_backend_for(spec: EvalSpec, model_dir: str, adapter_dir: str | None):
    import dynaplan.models as models

    load_backend = getattr(models, "load_backend", None)
    if load_backend is None and spec.backend == "hf":
        from dynaplan.models.hf import HFBackend

        return HFBackend(model_dir, adapter_dir, dtype=spec.dtype)
    if load_backend is None:
        raise RuntimeError(f"backend {spec.backend!r} needs dynaplan.models.load_backend, which is not there")
    if spec.backend == "openai":
        return load_backend("openai", model=model_dir, base_url=spec.base_url)
    return load_backend(spec.backend, model=model_dir, adapter=adapter_dir, dtype=spec.dtype)


def _env_seeded_teacher_policy():
    from dynaplan.agent.policy import TeacherPolicy

    class EnvSeededTeacherPolicy(TeacherPolicy):
        """The scripted expert seeded with the env seed itself when the policy seed is 0, as
        benchmarks/crafter_expert.py and `dynaplan play` seed it, so that this evaluation
        reproduces the benchmark's numbers on the same seeds; other seeds mix in the policy seed."""

        def start_episode(self, slot: int, seed: int, observation: str, info: dict) -> None:
            if self.seed != 0:
                return super().start_episode(slot, seed, observation, info)
            from dynaplan.teachers import make_teacher

            teacher = make_teacher(self.env_name, seed=seed, **self.teacher_kwargs)
            teacher.reset(observation, info)
            self._teachers[slot] = teacher
            self._plans[slot] = None

    return EnvSeededTeacherPolicy


def build_policy(spec: EvalSpec, env, seed: int, backend=None):
    """The policy an EvalSpec names, for one attempt's seed (`backend` is reused across attempts)."""
    from dynaplan.agent.policy import LLMPolicy, RandomPolicy, load_plans_file
    from dynaplan.models.base import SamplingParams

    EnvSeededTeacherPolicy = _env_seeded_teacher_policy()

    if spec.policy == "random":
        return RandomPolicy(env.action_names, seed=seed)
    if spec.policy == "expert":
        return EnvSeededTeacherPolicy(spec.env, seed=seed, count_tokens=_token_counter(spec.tokenizer))
    # POGS's fallback (stay put, an invalid move) depends on where the agent stands: read per step.
    default_action = (lambda info: str(info["current_node"])) if spec.env == "pogs" else env.default_action
    return LLMPolicy(
        backend,
        action_names=env.action_names,
        default_action=default_action,
        rules=env.rules,
        mode=spec.mode,
        k=spec.k,
        history_len=spec.history_len,
        max_prompt_tokens=spec.max_prompt_tokens,
        sampling=SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens),
        seed=seed,
        plans=load_plans_file(spec.plans) if spec.plans else None,
    )


# ---------------------------------------------------------------------------------------------
# Records


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def episode_record(result, spec: EvalSpec, attempt: int) -> dict:
    """An EpisodeResult from the rollout engine as the JSON record metrics.py reads."""
    info = result.final_info
    steps = []
    for s in result.steps:
        d = s.decision
        line = {
            "step": s.step,
            "action": d.action,
            "planned": d.plan is not None or d.plan_tokens > 0,
            "plan_text": d.plan,
            "plan_tokens": int(d.plan_tokens),
            "new_tokens": int(d.new_tokens),
            "valid": bool(d.valid),
            "fallback": bool(d.fallback),
            "text": d.text if len(d.text) <= 4000 else d.text[:4000],
            "current_plan": d.current_plan,
            "reward": s.reward,
            "progression": float(s.info.get("progression", 0.0)),
            "terminated": s.terminated,
            "truncated": s.truncated,
            "finish_reason": d.generation.finish_reason if d.generation is not None else None,
            "prompt_tokens": d.generation.prompt_tokens if d.generation is not None else None,
        }
        for key in _STEP_INFO_KEYS:
            if key in s.info:
                line[key] = _jsonable(s.info[key])
        steps.append(line)
    return {
        "episode_id": f"{spec.env}-{result.seed}-a{attempt}",
        "env": spec.env,
        "env_kwargs": _jsonable(spec.env_kwargs),
        "seed": int(result.seed),
        "attempt": attempt,
        "length": int(result.length),
        "reward": float(result.total_reward),
        "progression": float(info.get("progression", 0.0)),
        "achievements": _jsonable(dict(info.get("achievements", {}))),
        "crafter_achievements": _jsonable(info.get("crafter_achievements")),
        "terminated": bool(result.terminated),
        "truncated": bool(result.truncated),
        "steps": steps,
    }


# ---------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class EvalResult:
    metrics: dict
    episodes: list[dict]
    resumed: int  # episodes taken from the store instead of played
    played: int


def run_evaluation(
    spec: EvalSpec,
    store_path: str | os.PathLike[str],
    *,
    backend=None,
    progress: bool = True,
) -> EvalResult:
    """Play the missing (seed, attempt) episodes of `spec`, appending each to the store as it
    finishes, and return all of them in (attempt, seed) order with their metrics."""
    from dynaplan.envs import make_env
    from dynaplan.train.rollout import run_episodes

    store = EpisodeStore(store_path)
    done = {(ep["attempt"], ep["seed"]): ep for ep in store.load()}
    wanted = [(a, s) for a in range(spec.best_of) for s in spec.seeds]
    resumed = sum(1 for key in wanted if key in done)
    played = 0
    probe = make_env(spec.env, **spec.env_kwargs)
    try:
        if spec.policy == "model":
            # An LLM's attempts differ only by their sampling streams, so all missing
            # (attempt, seed) pairs share one lockstep batch (one policy, one backend call per
            # step). A finished episode takes the lowest missing attempt of its seed: attempts
            # of one seed are exchangeable samples.
            pending = [(a, s) for a, s in wanted if (a, s) not in done]
            if pending:
                if backend is None:
                    model_dir, adapter_dir, _ = resolve_model(spec.model)
                    backend = load_backend_for(spec, model_dir, spec.adapter or adapter_dir)
                policy = build_policy(spec, probe, spec.seed, backend)

                def persist_llm(result) -> None:
                    attempt = min(a for a, s in pending if s == result.seed and (a, s) not in done)
                    record = episode_record(result, spec, attempt)
                    store.append(record)
                    done[(attempt, record["seed"])] = record

                run_episodes(
                    policy, spec.env, spec.env_kwargs, [s for _, s in pending],
                    num_envs=spec.num_envs, max_steps=spec.max_steps, on_episode=persist_llm,
                    progress=progress, description=spec.name,
                )
                played += len(pending)
        for attempt in range(spec.best_of if spec.policy != "model" else 0):
            pending_seeds = [s for s in spec.seeds if (attempt, s) not in done]
            if not pending_seeds:
                continue
            # Scripted and random policies draw per episode from (policy seed, env seed), so
            # each attempt needs its own policy seed to be a different sample.
            policy = build_policy(spec, probe, spec.attempt_seed(attempt), backend)

            def persist(result, attempt=attempt) -> None:
                record = episode_record(result, spec, attempt)
                store.append(record)
                done[(attempt, record["seed"])] = record

            run_episodes(
                policy, spec.env, spec.env_kwargs, pending_seeds,
                num_envs=spec.num_envs, max_steps=spec.max_steps, on_episode=persist,
                progress=progress, description=f"{spec.name} attempt {attempt + 1}/{spec.best_of}",
            )
            played += len(pending_seeds)
    finally:
        probe.close()
    episodes = [done[key] for key in wanted]
    return EvalResult(metrics=score(spec, episodes), episodes=episodes, resumed=resumed, played=played)


def score(spec: EvalSpec, episodes: Sequence[dict]) -> dict:
    """metrics.json: the aggregate over the first attempt (the plain evaluation) and, with
    best_of > 1, the aggregate over all attempts and the best-of-N view."""
    first = [ep for ep in episodes if ep["attempt"] == 0]
    out = M.aggregate(first, spec.env)
    if spec.best_of > 1:
        out["all_attempts"] = {
            k: v for k, v in M.aggregate(episodes, spec.env).items()
            if k not in ("success_rates", "first_unlock_mean")
        }
        out["best_of"] = M.best_of_n(episodes, spec.env)
    return out


# ---------------------------------------------------------------------------------------------
# Outputs


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


EPISODE_COLUMNS = (
    "episode_id", "seed", "attempt", "progression", "num_achievements", "reward", "length", "plans",
    "plan_rate", "plan_tokens", "generated_tokens", "mean_plan_tokens", "mean_plan_chars",
    "plan_replaced_within_15", "invalid_actions", "invalid_rate", "valid_rate",
)


def episodes_csv(episodes: Sequence[dict]) -> str:
    """One row per episode: its metrics, the first-unlock step of each achievement, env settings."""
    names = M.achievement_names(episodes[0]["env"]) if episodes else ()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*EPISODE_COLUMNS, *(f"first_{n}" for n in names), "env", "env_kwargs", "terminated", "truncated"])
    for ep in episodes:
        m = M.episode_metrics(ep)
        row = ["" if m[c] is None else m[c] for c in EPISODE_COLUMNS]
        row += [ep["achievements"].get(n, "") for n in names]
        row += [ep["env"], json.dumps(ep.get("env_kwargs", {}), sort_keys=True), ep["terminated"], ep["truncated"]]
        writer.writerow(row)
    return buf.getvalue()


def steps_jsonl(episodes: Sequence[dict]) -> str:
    lines = []
    for ep in episodes:
        for s in ep["steps"]:
            row = {"episode_id": ep["episode_id"], "env": ep["env"], "seed": ep["seed"], "attempt": ep["attempt"], **s}
            lines.append(json.dumps(row, sort_keys=True, separators=(",", ":")))
    return "\n".join(lines) + ("\n" if lines else "")


def curve_rows(episodes: Sequence[dict]) -> list[dict]:
    """Per step t: means over episodes of cumulative progression, plans and generated tokens by
    step t (a finished episode keeps its final values) and the share of episodes still running."""
    if not episodes:
        return []
    horizon = max(len(ep["steps"]) for ep in episodes)
    totals = np.zeros((horizon, 4))
    for ep in episodes:
        progression = plans = tokens = 0.0
        for t in range(horizon):
            if t < len(ep["steps"]):
                s = ep["steps"][t]
                progression = s["progression"]
                plans += 1 if s["planned"] else 0
                tokens += s["new_tokens"]
                alive = 1.0
            else:
                alive = 0.0
            totals[t] += (progression, plans, tokens, alive)
    totals /= len(episodes)
    return [
        {"step": t, "progression": round(p, 6), "plans": round(n, 4), "generated_tokens": round(g, 2), "running": round(a, 4)}
        for t, (p, n, g, a) in enumerate(totals.tolist())
    ]


def curve_csv(episodes: Sequence[dict]) -> str:
    rows = curve_rows(episodes)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "progression", "plans", "generated_tokens", "running"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(spec: EvalSpec, result: EvalResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write metrics.json, episodes.csv, steps.jsonl, curve.csv and plots/ (each atomically)."""
    from dynaplan.eval import plots

    out = Path(out_dir)
    first = [ep for ep in result.episodes if ep["attempt"] == 0]
    metrics = dict(result.metrics)
    metrics["config"] = {k: v for k, v in asdict(spec).items() if v is not None}
    paths = {
        "metrics": out / "metrics.json",
        "episodes": out / "episodes.csv",
        "steps": out / "steps.jsonl",
        "curve": out / "curve.csv",
    }
    atomic_write_text(paths["episodes"], episodes_csv(result.episodes))
    atomic_write_text(paths["steps"], steps_jsonl(result.episodes))
    atomic_write_text(paths["curve"], curve_csv(first))
    paths["plots"] = plots.evaluation_plots(spec.name, spec.env, result.metrics, curve_rows(first), out / "plots")
    # metrics.json last: its presence marks a complete evaluation for the Pareto plot.
    atomic_write_text(paths["metrics"], json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------
# Wiring for the stage and the CLI

EVAL_ROOT = Path("reports/eval")
# Outside every stage's outs (DVC deletes outs before a stage runs), so a rerun can resume.
RESUME_ROOT = Path("reports/.resume")


def spec_from_params(params, *, name: str | None = None, policy: str = "expert", env: str | None = None,
                     **overrides) -> EvalSpec:
    """An EvalSpec from the validated params (evaluate, envs, prompt, seeds, model sections),
    with explicit overrides (CLI options) winning. LLM Crafter episodes are capped at
    evaluate.crafter_max_steps; baselines run evaluate.baseline_episodes full-length episodes."""
    ev = params.evaluate
    env = env or ev.env
    env_kwargs = getattr(params.envs, env).model_dump()
    llm = policy == "model"
    fields = dict(
        env=env, policy=policy, episodes=ev.episodes if llm else ev.baseline_episodes,
        best_of=1, seed_start=params.seeds.eval_start, seed=ev.seed, num_envs=ev.num_envs,
        max_steps=ev.crafter_max_steps if (llm and env == "crafter") else None,
        temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens, backend=ev.backend,
        mode=ev.mode, k=ev.k, history_len=params.prompt.history_len,
        max_prompt_tokens=params.prompt.max_prompt_tokens, dtype=params.model.dtype,
        tokenizer=params.model.dir if policy == "expert" else None, env_kwargs=env_kwargs,
        model=params.model.dir if llm else None,
    )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if name is None:
        label = fields["mode"] if llm else policy
        name = f"{label}-{env}" if not llm else f"{Path(str(fields['model'])).name}-{label}-{env}"
    return EvalSpec(name=name, **fields)


def scalar_metrics(metrics: Mapping) -> dict:
    """The numbers worth a metric in MLflow: the flat scalars, success rates, best-of-N."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for name, rate in metrics.get("success_rates", {}).items():
        out[f"success_rate.{name}"] = rate
    for key in ("all_attempts", "best_of"):
        for k, v in metrics.get(key, {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{key}.{k}"] = v
    return out


def evaluate(spec: EvalSpec, out_dir: str | os.PathLike[str] | None = None,
             resume_dir: str | os.PathLike[str] = RESUME_ROOT, *, track: bool = True,
             progress: bool = True, backend=None) -> tuple[EvalResult, dict[str, Path]]:
    """Run (or resume) an evaluation, write its outputs and, with `track`, log them to MLflow:
    one `evaluate` run with the spec as params, the scalars as metrics, the curve as per-step
    metrics, the outputs as artifacts; for a registry model also the metrics on its version."""
    out_dir = Path(out_dir) if out_dir is not None else EVAL_ROOT / spec.name
    store = Path(resume_dir) / f"{spec.name}-{fingerprint(spec)}.jsonl"
    if not track:
        result = run_evaluation(spec, store, backend=backend, progress=progress)
        return result, write_outputs(spec, result, out_dir)
    from dynaplan import tracking

    with tracking.stage_run("evaluate", params=asdict(spec), evaluation=spec.name, policy=spec.policy, env=spec.env):
        result = run_evaluation(spec, store, backend=backend, progress=progress)
        paths = write_outputs(spec, result, out_dir)
        scalars = scalar_metrics(result.metrics)
        tracking.log_metrics(scalars)
        for row in curve_rows([ep for ep in result.episodes if ep["attempt"] == 0]):
            tracking.log_metrics({"curve.progression": row["progression"], "curve.generated_tokens": row["generated_tokens"]}, step=row["step"])
        tracking.log_artifact(out_dir, artifact_path=f"eval/{spec.name}")
        if spec.model and spec.model.startswith(REGISTRY_PREFIX):
            record_on_version(spec, scalars)
    return result, paths


def record_on_version(spec: EvalSpec, scalars: Mapping[str, float]) -> None:
    """Put an evaluation's numbers on the registered model version it evaluated
    (tags `eval.<evaluation name>.<metric>`, via dynaplan.tracking.set_version_metrics)."""
    from dynaplan import tracking

    _, _, resolved = resolve_model(spec.model)
    tracking.set_version_metrics(resolved["version"], scalars, prefix=f"eval.{spec.name}.", name=resolved["name"])
