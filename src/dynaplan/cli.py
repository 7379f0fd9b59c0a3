"""`dynaplan ...`: the command line (typer + rich). Thin: parse options, call library code.

Exit codes: 0 success, 1 runtime failure, 2 usage or config error (a ConfigError anywhere).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from dynaplan.config import EXIT_USAGE, ConfigError, load_params

app = typer.Typer(help="dynaplan: train LLM agents that decide when to plan.", no_args_is_help=True)
params_app = typer.Typer(help="Inspect and validate params.yaml.", no_args_is_help=True)
app.add_typer(params_app, name="params")
train_app = typer.Typer(help="Train agents: `train sft`, `train ppo`.", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console()
err_console = Console(stderr=True)


def fail_usage(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(EXIT_USAGE)


@params_app.command("check")
def params_check(params: Path = typer.Option(Path("params.yaml"), help="params file to validate")) -> None:
    """Validate a params file; exit 2 with the offending key named if it is wrong."""
    try:
        load_params(params)
    except ConfigError as err:
        fail_usage(str(err))
    console.print(f"[green]ok[/]: {params} is valid")


@app.command("generate")
def generate_cmd(
    out: Path = typer.Option(Path("data/teacher"), help="dataset folder (the generate stage's output)"),
    workers: int = typer.Option(None, help="worker processes (default: generate.workers)"),
    tokenizer: Path = typer.Option(None, help="tokenizer folder (default: model.dir)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Teacher rollouts to Parquet shards, as the DVC stage does; resumes a killed run."""
    from dynaplan.data.generation import generate_dataset

    try:
        loaded = load_params(params)
    except ConfigError as err:
        fail_usage(str(err))
    if workers is not None and workers < 1:
        fail_usage(f"--workers must be >= 1, got {workers}")
    try:
        result = generate_dataset(loaded, out, tokenizer_dir=tokenizer, workers=workers)
    except FileNotFoundError as err:
        fail_usage(str(err))
    manifest = result.manifest
    console.print(
        f"[green]generated[/] {manifest['rows']} steps, {manifest['episodes']} episodes in {out} "
        f"({result.reused_shards} shards kept); digest {manifest['digest'][:16]}"
    )


@app.command("validate")
def validate_cmd(
    data: Path = typer.Option(Path("data/teacher"), help="dataset folder to check"),
    docs: Path = typer.Option(None, help="write Great Expectations Data Docs (HTML) here"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Run the Great Expectations suite over a dataset; exit 1 naming each failed expectation."""
    from rich.table import Table

    from dynaplan.data.dataset import read_table
    from dynaplan.data.expectations import chat_token_counter, env_action_sets, validate_dataset

    try:
        loaded = load_params(params)
        table = read_table(data)
    except (ConfigError, FileNotFoundError) as err:
        fail_usage(str(err))
    envs = sorted(set(table["env"].to_pylist()))
    report = validate_dataset(
        table, loaded, action_sets=env_action_sets(loaded, envs),
        count_seq_tokens=chat_token_counter(loaded.model.dir), docs_dir=docs,
    )
    summary = Table("expectation", "success", "unexpected")
    for outcome in report.outcomes:
        summary.add_row(outcome.name, "[green]yes[/]" if outcome.success else "[red]NO[/]", str(outcome.unexpected_count))
    console.print(summary)
    if not report.success:
        err_console.print(report.failure_message())
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {len(report.outcomes)} expectations passed on {report.rows} rows")


@app.command("play")
def play_cmd(
    env: str = typer.Option("crafter", help="crafter or pogs"),
    policy: str = typer.Option("human", help="human (you type actions), expert or random"),
    seed: int = typer.Option(0, min=0, help="env seed (also seeds the expert or random player)"),
    max_steps: int | None = typer.Option(None, min=1, help="episode cap (default: envs.<env>.max_steps)"),
    quiet: bool = typer.Option(False, help="print only the summary (expert and random players)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file with the envs section"),
) -> None:
    """Play or watch one episode in the terminal, then print a summary table."""
    from dynaplan.agent.play import PLAY_POLICIES, play, summary_table
    from dynaplan.config import Params

    if policy not in PLAY_POLICIES:
        fail_usage(f"--policy {policy!r} is not one of {', '.join(PLAY_POLICIES)}")
    try:
        loaded = load_params(params) if params.is_file() else Params()
    except ConfigError as err:
        fail_usage(str(err))
    env_params = getattr(loaded.envs, env, None)
    if env_params is None:
        fail_usage(f"--env {env!r} is not one of crafter, pogs")
    result = play(
        env, policy, seed, env_kwargs=env_params.model_dump(), max_steps=max_steps,
        console=console, show=not quiet or policy == "human",
    )
    console.print(summary_table(result))


@app.command("evaluate")
def evaluate_cmd(
    policy: str = typer.Option("model", help="expert | random | model"),
    env: str = typer.Option(None, help="crafter | pogs (default: evaluate.env)"),
    model: str = typer.Option(None, help="model dir or models:/dynaplan-agent/<version|@alias> (default: model.dir)"),
    adapter: str = typer.Option(None, help="LoRA adapter dir on top of --model"),
    backend: str = typer.Option(None, help="hf | openai | vllm (default: evaluate.backend)"),
    base_url: str = typer.Option(None, help="openai backend: server base URL, e.g. http://127.0.0.1:8000/v1"),
    mode: str = typer.Option(None, help="dynamic | every_k | never | always (default: evaluate.mode)"),
    k: int = typer.Option(None, help="planning interval for every_k (default: evaluate.k)"),
    plans: str = typer.Option(None, help="human plans file (YAML) injected into the plan block"),
    episodes: int = typer.Option(None, help="held-out seeds (default: evaluate.episodes, baselines evaluate.baseline_episodes)"),
    best_of: int = typer.Option(None, "--best-of", help="attempts per seed: any-of-N success and the best episode"),
    num_envs: int = typer.Option(None, help="envs in lockstep (default: evaluate.num_envs)"),
    max_steps: int = typer.Option(None, help="cap on steps per episode (default: evaluate.crafter_max_steps for LLM Crafter)"),
    name: str = typer.Option(None, help="evaluation name: output folder reports/eval/<name>"),
    out: Path = typer.Option(None, help="output folder (default: reports/eval/<name>)"),
    track: bool = typer.Option(True, help="log to MLflow"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """Evaluate a policy on the held-out seeds (resumes finished episodes); writes metrics.json,
    episodes.csv, steps.jsonl, curve.csv and plots, and logs them to MLflow."""
    from rich.table import Table

    from dynaplan.eval.runner import evaluate, spec_from_params

    try:
        spec = spec_from_params(
            load_params(params), name=name, policy=policy, env=env, model=model, adapter=adapter,
            backend=backend, base_url=base_url, mode=mode, k=k, plans=plans, episodes=episodes,
            best_of=best_of, num_envs=num_envs, max_steps=max_steps,
        )
    except (ConfigError, ValueError, TypeError) as err:
        fail_usage(str(err))
    if spec.plans and not Path(spec.plans).is_file():
        fail_usage(f"plans file not found: {spec.plans}")
    try:
        result, paths = evaluate(spec, out_dir=out, track=track)
    except (FileNotFoundError, ValueError) as err:
        fail_usage(str(err))
    except Exception as err:  # a backend that died mid-run: the finished episodes are kept
        err_console.print(f"[bold red]evaluation failed:[/] {type(err).__name__}: {err}")
        err_console.print("finished episodes are saved; run the same command again to resume")
        raise typer.Exit(1)
    m = result.metrics
    table = Table(title=f"{spec.name} ({spec.env}, {m['episodes']} episodes; {result.played} played, {result.resumed} resumed)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("progression", "crafter_score", "reward", "length", "plans", "plan_rate", "plan_tokens",
                "generated_tokens", "invalid_rate", "valid_rate"):
        if key in m:
            se = m.get(f"{key}_se")
            table.add_row(key, f"{m[key]:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
    if "best_of" in m:
        b = m["best_of"]
        table.add_row(f"best-of-{b['n']} progression", f"{b['progression']:.4g} ± {b['progression_se']:.2g}")
        if "crafter_score" in b:
            table.add_row(f"best-of-{b['n']} crafter_score", f"{b['crafter_score']:.4g}")
    console.print(table)
    console.print(f"outputs in {paths['metrics'].parent}")


@app.command("serve")
def serve_cmd(
    model: list[Path] = typer.Option(..., help="model dir (safetensors HF dir, e.g. models/base); repeat to serve several"),
    adapter: Path = typer.Option(None, help="optional PEFT LoRA adapter dir trained on --model (one model only)"),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port"),
    host: str = typer.Option("127.0.0.1", help="bind address (keep loopback unless you mean it)"),
    name: str = typer.Option(None, help="model name clients send (default: the --model path)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    max_batch: int = typer.Option(32, min=1, help="largest batch of concurrent requests"),
    enable_lora: bool = typer.Option(False, "--enable-lora", help="accept POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA API; PPO's openai rollouts use it)"),
) -> None:
    """Serve --model (+ --adapter) as an OpenAI-compatible /v1/chat/completions API (vLLM dialect)."""
    for path in model:
        if not (path / "config.json").is_file():
            fail_usage(f"--model {path}: no config.json there (run `dvc repro base_model` for models/base)")
    if len(model) > 1 and (adapter is not None or name is not None):
        fail_usage("--adapter and --name need exactly one --model")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        fail_usage(f"--adapter {adapter}: no adapter_config.json there")
    if dtype not in ("float32", "bfloat16", "float16"):
        fail_usage(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    from dynaplan.models.hf import AdapterMismatchError
    from dynaplan.models.server import serve

    err_console.print(f"serving {', '.join(map(str, model))} on http://{host}:{port}/v1")
    try:
        serve([str(m) for m in model], None if adapter is None else str(adapter), host=host, port=port,
              model_name=name, device=device, dtype=dtype, max_batch=max_batch, enable_lora=enable_lora)
    except AdapterMismatchError as err:
        fail_usage(str(err))


@app.command("replay")
def replay_cmd(
    episode: str = typer.Argument(..., help="an evaluation folder or its steps.jsonl, optionally #EPISODE_ID (default: its first episode)"),
    out: Path = typer.Option(..., help="FILE.gif or FILE.html"),
    max_frames: int = typer.Option(300, help="at most this many frames, evenly spread over the episode"),
    fps: float = typer.Option(4.0, help="GIF frames per second"),
) -> None:
    """Replay a recorded episode from its seed and actions and render it with the plan, the
    action and the inventory beside each frame."""
    from dynaplan.eval.viewer import ReplayError, replay

    try:
        written = replay(episode, out, max_frames=max_frames, fps=fps)
    except ReplayError as err:
        fail_usage(str(err))
    console.print(f"[green]wrote[/] {written}")

@app.command("promote")
def promote_command(
    params: Path = typer.Option(Path("params.yaml"), help="params file (section `promote`)"),
    margin_se: float = typer.Option(None, help="override promote.margin_se (paired standard errors)"),
    max_tokens_per_episode: float = typer.Option(None, help="override promote.max_tokens_per_episode"),
    episodes: int = typer.Option(None, help="override promote.episodes (held-out seeds)"),
    evaluate_missing: bool = typer.Option(None, "--evaluate-missing/--no-evaluate-missing", help="override promote.evaluate_missing"),
    record: Path = typer.Option(Path("reports/promote/decision.json"), help="where the decision record goes"),
) -> None:
    """Promote the `challenger` version to `champion` if it beats it on the same held-out seeds."""
    from dynaplan.config import parse_params
    from dynaplan.promotion import PromotionError, run_gate

    try:
        loaded = load_params(params)
        overrides = {"margin_se": margin_se, "max_tokens_per_episode": max_tokens_per_episode,
                     "episodes": episodes, "evaluate_missing": evaluate_missing}
        raw = loaded.model_dump(mode="json", by_alias=True)
        raw["promote"].update({k: v for k, v in overrides.items() if v is not None})
        loaded = parse_params(raw, f"{params} + command-line options")
    except ConfigError as err:
        fail_usage(str(err))
    try:
        decision = run_gate(loaded, record)
    except PromotionError as err:
        err_console.print(f"[bold red]refused:[/] {err}")
        raise typer.Exit(1)
    if decision is None:
        console.print(f"[yellow]no_candidate[/]: no version of the model has the alias 'challenger' (record: {record})")
        return
    colour = "green" if decision.promoted else "yellow"
    console.print(f"[{colour}]{decision.outcome}[/]: {decision.reason}")
    console.print(f"decision record: {record}")


@train_app.command("ppo")
def train_ppo_cmd(
    ablation: str = typer.Option("sft_dynamic", help="sft_dynamic | sft_never | base (RL without SFT)"),
    plan_cost: float = typer.Option(None, help="reward charged per plan token (default: ppo.plan_cost)"),
    iterations: int = typer.Option(None, help="rollout + update iterations (default: ppo.iterations)"),
    num_envs: int = typer.Option(None, help="envs in lockstep (default: ppo.num_envs)"),
    env: str = typer.Option(None, help="crafter | pogs (default: ppo.env)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """PPO with a plan-token cost, as the DVC stage ppo@<ablation> runs it: resumes from
    checkpoints/ppo-<ablation>, writes models/ppo-<ablation> and metrics/ppo-<ablation>.json."""
    from dynaplan.config import parse_params
    from dynaplan.train.ppo import ABLATIONS, PpoDivergence, PpoPaths, ppo_stage

    if ablation not in ABLATIONS:
        fail_usage(f"--ablation {ablation!r}: expected one of {', '.join(ABLATIONS)}")
    overrides = {"plan_cost": plan_cost, "iterations": iterations, "num_envs": num_envs, "env": env}
    try:
        loaded = load_params(params)
        raw = loaded.model_dump(mode="json", by_alias=True)
        raw["ppo"].update({k: v for k, v in overrides.items() if v is not None})
        loaded = parse_params(raw, f"{params} + command-line options")
        paths = PpoPaths(
            base_dir=Path(loaded.model.dir), sft_root=Path("models"), out_dir=Path(f"models/ppo-{ablation}"),
            checkpoint_dir=Path(f"checkpoints/ppo-{ablation}"), metrics_path=Path(f"metrics/ppo-{ablation}.json"),
        )
        out = ppo_stage(loaded, ablation, paths)
    except ConfigError as err:
        fail_usage(str(err))
    except PpoDivergence as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(1)
    console.print(
        f"[green]ppo@{ablation}[/] plan_cost={out['plan_cost']}: return {out['return']:.3f}, progression "
        f"{out['progression']:.3f}, plan tokens/episode {out['plan_tokens_per_episode']:.1f} -> {out['model_uri']}"
    )


@train_app.command("sft")
def train_sft_cmd(
    variant: str = typer.Option("dynamic", help="dynamic (the teacher's plans) | naive (plans stripped)"),
    max_steps: int = typer.Option(None, help="optimizer steps, 0 = from epochs (default: sft.max_steps)"),
    epochs: float = typer.Option(None, help="passes over the training examples (default: sft.epochs)"),
    learning_rate: float = typer.Option(None, help="peak learning rate (default: sft.learning_rate)"),
    max_train_examples: int = typer.Option(None, help="training examples, 0 = all (default: sft.max_train_examples)"),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: sft.bf16)"),
    data: Path = typer.Option(Path("data/teacher"), help="teacher step shards (the generate stage)"),
    report: Path = typer.Option(Path("reports/validate/summary.json"), help="the validate stage's report"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
) -> None:
    """SFT priming, as the DVC stage sft@<variant> runs it: resumes from checkpoints/sft-<variant>,
    writes models/sft-<variant>/adapter and metrics/sft-<variant>.json, registers dynaplan-agent."""
    from rich.table import Table

    from dynaplan.config import parse_params
    from dynaplan.train.sft import SftPaths, sft_stage
    from dynaplan.train.sft_data import VARIANTS, SftInputError

    if variant not in VARIANTS:
        fail_usage(f"--variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    overrides = {"max_steps": max_steps, "epochs": epochs, "learning_rate": learning_rate,
                 "max_train_examples": max_train_examples, "bf16": bf16}
    try:
        loaded = load_params(params)
        raw = loaded.model_dump(mode="json", by_alias=True)
        raw["sft"].update({k: v for k, v in overrides.items() if v is not None})
        loaded = parse_params(raw, f"{params} + command-line options")
        paths = SftPaths(
            data_dir=data, report=report, base_dir=Path(loaded.model.dir), out_dir=Path(f"models/sft-{variant}"),
            checkpoint_dir=Path(f"checkpoints/sft-{variant}"),
        )
        out = sft_stage(loaded, variant, paths, Path(f"metrics/sft-{variant}.json"))
    except (ConfigError, SftInputError) as err:
        fail_usage(str(err))
    table = Table(title=f"sft@{variant} on {out['heldout_examples']} held-out steps")
    for column in ("held-out loss", "action accuracy", "format valid", "plan rate (teacher)", "KL to base"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{out['heldout_loss']:.3f}", f"{out['action_accuracy']:.3f}", f"{out['format_valid']:.3f}",
        f"{out['plan_rate']:.3f} ({out['teacher_plan_rate']:.3f})", f"{out['kl_to_base']:.4f}",
    )
    console.print(table)
    console.print(f"[green]registered[/] {out['model_uri']}")


if __name__ == "__main__":
    app()
