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


if __name__ == "__main__":
    app()
