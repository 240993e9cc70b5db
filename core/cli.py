"""The ``loragate`` command: one sub-command group per component."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

from loragate.console import errors
from loragate.gateway.cli import cost_app, gateway_app, keys_app, rollout_app, ui_command
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
) -> None:
    """Train, score and register adapter versions on the offline base, promote one, canary another."""
    from loragate.demo import run_demo  # torch and peft load only when the demo runs

    run_demo(fresh=fresh, keep_serving=keep_serving)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except (RegistryError, ConverterError) as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "input"
        errors.print(f"[red]error:[/red] {where}: {first['msg']}", highlight=False)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        errors.print(f"[red]error:[/red] {exc.strerror}: {exc.filename}", highlight=False)
        sys.exit(2)
