"""``loragate webhooks ...``: receivers of registry and rollout events, and their delivery log."""

from __future__ import annotations

import typer

from loragate.console import console, emit, table

from .api import Registry
from .webhook_sender import WebhookSender
from .webhooks import EVENT_TYPES, Webhooks

app = typer.Typer(help="Signed events for other systems: versions, evals, alias moves, rollouts.",
                  no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")


@app.command()
def add(url: str,
        event: list[str] = typer.Option([], "--event", "-e", help="An event type (repeat); default all. "
                                        "`loragate webhooks events` lists them."),
        secret: str | None = typer.Option(None, help="whsec_<base64>; default a new random one."),
        as_json: bool = JSON) -> None:
    """Send events to URL, signed with a secret (shown once here, kept to sign)."""
    created = Webhooks(Registry()).add(url, events=event, secret=secret)
    emit(created, as_json, lambda: console.print(
        f"webhook {created.webhook.id} -> {url} ({', '.join(created.webhook.events)})\n"
        f"secret: {created.secret}\nverify with any Standard Webhooks library, e.g. "
        f"standardwebhooks.Webhook(secret).verify(body, headers)"))


@app.command("list")
def list_webhooks(as_json: bool = JSON) -> None:
    """Webhooks and how their deliveries stand."""
    hooks = Webhooks(Registry()).list()
    emit(hooks, as_json, lambda: table("webhooks", ["id", "url", "events", "pending", "delivered", "failed"],
                                       [[h.id, h.url, ",".join(h.events), h.pending, h.delivered, h.failed]
                                        for h in hooks]))


@app.command()
def rm(webhook_id: int) -> None:
    """Stop sending to a webhook; its pending deliveries are marked failed."""
    Webhooks(Registry()).remove(webhook_id)
    console.print(f"removed webhook {webhook_id}")


@app.command()
def events() -> None:
    """The event types a webhook can ask for."""
    table("event types", ["type", "when"], [[k, v] for k, v in EVENT_TYPES.items()])


@app.command()
def deliveries(webhook: int | None = typer.Option(None, help="Only this webhook's."),
               status: str | None = typer.Option(None, help="pending, delivered or failed."),
               limit: int = typer.Option(50), as_json: bool = JSON) -> None:
    """The delivery log, newest first: attempts, last status code or error."""
    rows = Webhooks(Registry()).deliveries(webhook_id=webhook, status=status, limit=limit)
    emit(rows, as_json, lambda: table("webhook deliveries",
                                      ["id", "webhook", "event", "type", "adapter", "status", "attempts", "last"],
                                      [[d.id, d.webhook_id, d.event_id, d.event_type, d.adapter or "-", d.status,
                                        d.attempts, d.last_error or d.last_status_code or ""] for d in rows]))


@app.command()
def redeliver(delivery_id: int) -> None:
    """Send a delivery again (a failed one, or one a receiver lost)."""
    Webhooks(Registry()).redeliver(delivery_id)
    console.print(f"delivery {delivery_id} is pending again")


@app.command()
def deliver(once: bool = typer.Option(False, help="Send what is due now and exit (cron); default: run until stopped.")
            ) -> None:
    """Send pending deliveries. Gateways do this too (webhooks.deliver_in_gateway); run it where none does."""
    sender = WebhookSender(Registry())
    try:
        sender.run(once=once)
    except KeyboardInterrupt:
        pass
    finally:
        sender.stop()
