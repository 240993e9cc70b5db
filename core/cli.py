"""The ``loragate`` command: one sub-command group per component."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError
from rich.markup import escape

from loragate.console import errors
from loragate.demo import DemoBudget
from loragate.extras import MissingExtra, require
from loragate.gateway.cli import cost_app, gateway_app, keys_app, rollout_app, ui_command
from loragate.gateway.engine_serve.cli import engine_app
from loragate.quantize.cli import app as quantize_app
from loragate.registry.cli import app as registry_app
from loragate.registry.errors import RegistryError
from loragate.registry.webhook_cli import app as webhooks_app
from loragate.trainer.cli import eval_command, judge_shadow_command, train_command
from loragate.trainer.data_cli import data_app
from loragate.quantize.llama_cpp_tools import ConverterError

app = typer.Typer(
    help="loragate: version, train, quantize and serve LoRA adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(registry_app, name="registry")
app.add_typer(gateway_app, name="gateway")
app.add_typer(engine_app, name="engine")
app.add_typer(rollout_app, name="rollout")
app.add_typer(keys_app, name="keys")
app.add_typer(cost_app, name="cost")
app.add_typer(quantize_app, name="quantize")
app.add_typer(data_app, name="data")
app.add_typer(webhooks_app, name="webhooks")
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("ui")(ui_command)
rollout_app.command("judge")(judge_shadow_command)  # the judge is the trainer's; the gateway never imports it


@app.command()
def demo(
    fresh: bool = typer.Option(False, help="Start from an empty LORAGATE_HOME registry."),
    keep_serving: bool = typer.Option(False, help="Leave the gateway up at the end and print its web console's URL."),
    steps: int = typer.Option(DemoBudget.steps, min=4, help="Training steps of each good version."),
    eval_examples: int = typer.Option(DemoBudget.eval_examples, min=10, help="Held-out examples each version is scored on."),
    requests: int = typer.Option(DemoBudget.requests, min=20, help="Requests sent through the gateway during the canary."),
) -> None:
    """Train, score and register adapter versions on the offline base, promote one, canary another."""
    require("train", "llamacpp", what="demo")
    from loragate.demo import run_demo  # torch and peft load only when the demo runs

    run_demo(fresh=fresh, keep_serving=keep_serving,
             budget=DemoBudget(steps=steps, eval_examples=eval_examples, requests=requests))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except (RegistryError, ConverterError, MissingExtra) as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "input"
        errors.print(f"[red]error:[/red] {where}: {first['msg']}", highlight=False)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        errors.print(f"[red]error:[/red] {exc.strerror}: {exc.filename}", highlight=False)
        sys.exit(2)
