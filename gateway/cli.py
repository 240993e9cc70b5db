"""``loragate gateway|rollout|keys|cost ...``: serve, steer traffic, manage keys, read the meter."""

from __future__ import annotations

import ipaddress

import typer

from loragate.console import console, emit, table
from loragate.extras import require, serving_extras
from loragate.registry import InvalidInput, Registry
from loragate.settings import Settings

from .cost import CostRow, GroupBy, cost_report, parse_since
from .keys import KeyStore
from .rollouts import Comparison, Ramp, RolloutService, RolloutStatus, Thresholds

gateway_app = typer.Typer(help="The OpenAI-compatible gateway.", no_args_is_help=True)
rollout_app = typer.Typer(help="A/B rollouts between production and a candidate version.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the gateway.", no_args_is_help=True)
cost_app = typer.Typer(help="Cost, tokens and latency from the meter.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")


@gateway_app.command()
def serve(host: str | None = typer.Option(None, help="Default: settings gateway.host (127.0.0.1)."),
          port: int | None = typer.Option(None, help="Default: settings gateway.port (8000).")) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /metrics."""
    import uvicorn

    from .app import create_app

    registry = Registry()
    settings = registry.settings
    require(*serving_extras(settings), what="gateway serve")
    host = _listen_host(registry, host)
    uvicorn.run(create_app(settings), host=host, port=port or settings.gateway.port, log_level="warning",
                timeout_graceful_shutdown=30, **proxy_options(settings))


def ui_command(host: str | None = typer.Option(None, help="Default: settings gateway.host (127.0.0.1)."),
               port: int = typer.Option(8001, help="The gateway serves the same console at /ui on its own port.")) -> None:
    """The web console alone, for a registry without a running gateway: http://HOST:PORT/ui."""
    import uvicorn

    from .console import create_console_app

    registry = Registry()
    host = _listen_host(registry, host)
    console.print(f"console at http://{host}:{port}/ui")
    uvicorn.run(create_console_app(registry.settings), host=host, port=port, log_level="warning",
                **proxy_options(registry.settings))


def proxy_options(settings: Settings) -> dict:
    """uvicorn reads X-Forwarded-For/-Proto from the configured proxies only (its own default trusts
    127.0.0.1, i.e. anything on this host)."""
    trusted = settings.gateway.trusted_proxies
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or []}


def _listen_host(registry: Registry, host: str | None) -> str:
    host = host or registry.settings.gateway.host
    keys = KeyStore(registry)
    keys.ensure_configured()  # before the check: a deployment's configured key lets it listen
    if not keys.any_active() and not ipaddress.ip_address(host).is_loopback:
        raise InvalidInput(f"no API keys exist, so loragate serves only on loopback, not {host}; "
                           "create one with `loragate keys create`, or configure gateway.admin_key")
    return host


def print_rollout_status(status: RolloutStatus) -> None:
    if status.shadow is not None:
        return print_shadow_status(status)
    console.print(f"rollout {status.id} of {status.adapter}: {status.status}, {status.weight:g}% to the candidate"
                  + (f" ({status.end_reason})" if status.end_reason else "")
                  + (f"; ramp {', '.join(f'{w:g}' for w in status.ramp)}" if status.ramp else ""))
    latency = status.latency_ratio_interval
    ratio = ("not comparable yet" if latency is None else
             f"{latency.estimate:.2f}x production's [{latency.low:.2f}x, {latency.high:.2f}x]")
    console.print(f"candidate time per output token at equal batch sizes: {ratio}")
    table(None, ["arm", "version", "requests", "error rate", "p50 ms", "p95 ms", "queue p50 ms", "ms/token p50",
                 "$ per 1k requests"],
          [[a.arm, a.version, a.requests, f"{a.error_rate:.1%}", _ms(a.p50_ms), _ms(a.p95_ms), _ms(a.queue_p50_ms),
            "-" if a.tpot_p50_ms is None else f"{a.tpot_p50_ms:.1f}", f"{a.cost_per_1k_usd:.4f}"]
           for a in status.arms])
    # Outcomes: only the kinds that came in.
    kinds = {"success": lambda a: a.success_n and f"{_rate(a.success_rate)} of {a.success_n}",
             "mean score": lambda a: a.score_n and f"{a.mean_score:.3f} of {a.score_n}",
             "labels": lambda a: ", ".join(f"{k} {v}" for k, v in sorted(a.labels.items())),
             "output check passed": lambda a: a.output_checked and f"{_rate(a.output_ok_rate)} of {a.output_checked}"}
    present = [k for k, cell in kinds.items() if any(cell(a) for a in status.arms)]
    if present:
        table("outcomes (95% always-valid intervals)", ["arm", *present],
              [[a.arm, *(kinds[k](a) or "-" for k in present)] for a in status.arms])
    diffs = {"success rate": status.success_diff, "mean score": status.score_diff,
             "output check pass rate": status.output_ok_diff, "error rate": status.error_rate_diff}
    shown = {name: diff for name, diff in diffs.items() if diff is not None}
    table("candidate - production (always-valid intervals)", [*shown, "$ per 1k requests"],
          [[*(_diff(d) for d in shown.values()),
            "-" if status.cost_per_1k_diff_usd is None else f"{status.cost_per_1k_diff_usd:+.4f}"]])


def print_shadow_status(status: RolloutStatus) -> None:
    shadow = status.shadow
    console.print(f"shadow {status.id} of {status.adapter}: {status.status}, copies of {status.weight:g}% of requests "
                  f"to {status.adapter}@{status.arms[1].version}" + (f" ({status.end_reason})" if status.end_reason else ""))
    production = status.arms[0]
    table(None, ["arm", "version", "requests", "p50 ms", "$ per 1k requests", "exact agreement", "token F1",
                 "dropped", "failed"],
          [[production.arm, production.version, production.requests, _ms(production.p50_ms),
            f"{production.cost_per_1k_usd:.4f}", "", "", "", ""],
           ["shadow", status.arms[1].version, shadow.pairs, _ms(shadow.p50_ms), f"{shadow.cost_per_1k_usd:.4f}",
            "-" if shadow.exact_agreement is None else f"{shadow.exact_agreement:.1%}",
            "-" if shadow.token_f1 is None else f"{shadow.token_f1:.3f}", shadow.dropped, shadow.failed]])


def _rate(value: Comparison) -> str:
    return f"{value.estimate:.1%} [{value.low:.1%}, {value.high:.1%}]"


def _diff(value: Comparison) -> str:
    return f"{value.estimate * 100:+.1f} pt [{value.low * 100:+.1f}, {value.high * 100:+.1f}]"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


@rollout_app.command()
def start(name: str, candidate: int = typer.Option(..., help="Candidate version number."),
          weight: float = typer.Option(5.0, help="Percent of users sent to the candidate (without --ramp)."),
          min_requests: int = typer.Option(20, help="Per arm, requests (and outcomes) before any verdict."),
          max_error_rate: float = typer.Option(0.05, help="Candidate 5xx rate that triggers a rollback."),
          max_latency_ratio: float = typer.Option(1.5, help="Candidate over production median time per output token that triggers one."),
          max_success_drop: float = typer.Option(0.02, help="Success rate (or mean score) drop against production that triggers one (0.02 = 2 points)."),
          alpha: float = typer.Option(0.05, help="1 - confidence of every verdict (always-valid)."),
          ramp: str | None = typer.Option(None, help="Weights to step through automatically, e.g. 5,10,25,50,100."),
          step_min_requests: int = typer.Option(100, help="Candidate requests at a weight before the next step."),
          step_min_minutes: float = typer.Option(0.0, help="Minutes at a weight before the next step."),
          as_json: bool = JSON) -> None:
    """Split NAME's traffic between production and a candidate version, sticky per user."""
    service = RolloutService(Registry())
    plan = None
    if ramp:
        try:
            plan = Ramp([float(w) for w in ramp.split(",")], step_min_requests, step_min_minutes)
        except ValueError:
            raise typer.BadParameter("--ramp takes weights such as 5,10,25,50,100") from None
    service.start(name, candidate, weight,
                  Thresholds(min_requests, max_error_rate, max_latency_ratio, max_success_drop, alpha), plan)
    status = service.status(name)
    emit(status, as_json, lambda: print_rollout_status(status))


@rollout_app.command()
def shadow(name: str, candidate: int = typer.Option(..., help="Candidate version number."),
           percent: float = typer.Option(10.0, help="Percent of users whose requests the candidate also answers."),
           as_json: bool = JSON) -> None:
    """Try a candidate on real traffic without exposing anyone: production answers every request, and
    the candidate answers a copy of PERCENT% of them off the response path; `rollout status` compares."""
    service = RolloutService(Registry())
    service.shadow(name, candidate, percent)
    status = service.status(name)
    emit(status, as_json, lambda: print_rollout_status(status))


@rollout_app.command("set-weight")
def set_weight(name: str, weight: float) -> None:
    """Change the candidate's share (users already on the candidate stay there when it grows)."""
    RolloutService(Registry()).set_weight(name, weight)
    console.print(f"{name}: {weight:g}% to the candidate")


@rollout_app.command()
def promote(name: str, reason: str | None = typer.Option(None)) -> None:
    """Promote the candidate to production (through the registry's gate) and end the rollout."""
    rollout = RolloutService(Registry()).promote(name, reason=reason)
    console.print(f"{name}@{rollout.candidate_version} is production; rollout {rollout.id} ended")


@rollout_app.command()
def abort(name: str, reason: str | None = typer.Option(None)) -> None:
    """End the rollout; all traffic back on production."""
    RolloutService(Registry()).abort(name, reason=reason)
    console.print(f"{name}: rollout aborted, all traffic on production")


@rollout_app.command()
def status(name: str, as_json: bool = JSON) -> None:
    """Per arm: requests, error rate, p50/p95 latency, queueing, time per output token, cost per 1k requests."""
    report = RolloutService(Registry()).status(name)
    emit(report, as_json, lambda: print_rollout_status(report))


@keys_app.command()
def create(name: str = typer.Option(...), scope: str = typer.Option("user", help="user or admin"),
           rpm: int | None = typer.Option(None, help="Requests per minute."),
           tpm: int | None = typer.Option(None, help="Tokens per minute."),
           model: list[str] = typer.Option([], help="A model this key may use (repeat); default all."),
           as_json: bool = JSON) -> None:
    """Create a key. It is shown once; only its sha256 is stored."""
    created = KeyStore(Registry()).create(name, scope=scope, rpm=rpm, tpm=tpm, models=model)
    emit({"id": created.key.id, "key": created.token, "scope": scope}, as_json,
         lambda: console.print(f"key {created.key.id} ({scope}): {created.token}\nstore it now; it is not shown again"))


@keys_app.command("list")
def list_keys(as_json: bool = JSON) -> None:
    """Keys (never their secrets)."""
    keys = KeyStore(Registry()).list()
    emit([k.model_dump(exclude={"key_sha256"}) for k in keys], as_json,
         lambda: table("keys", ["id", "name", "scope", "rpm", "tpm", "models", "revoked"],
                       [[k.id, k.name, k.scope, k.rpm, k.tpm, ",".join(k.models) or "all",
                         k.revoked_at or ""] for k in keys]))


@keys_app.command()
def revoke(key_id: str) -> None:
    """Revoke a key (replicas notice within 5 seconds)."""
    KeyStore(Registry()).revoke(key_id)
    console.print(f"revoked {key_id}")


@cost_app.command()
def report(since: str | None = typer.Option(None, help="30m, 2h, 7d or an ISO date."),
           by: str = typer.Option("adapter", help="adapter, version, arm or key."), as_json: bool = JSON) -> None:
    """Requests, tokens, latency, error rate and cost per 1k requests."""
    if by not in ("adapter", "version", "arm", "key"):
        raise InvalidInput("--by takes adapter, version, arm or key")
    group: GroupBy = by  # type: ignore[assignment]
    rows = cost_report(Registry(), since=parse_since(since) if since else None, by=group)
    emit(rows, as_json, lambda: print_cost(rows, by))


def print_cost(rows: list[CostRow], by: str) -> None:
    table(f"cost by {by}", [by, "requests", "prompt tok", "completion tok", "p50 ms", "p95 ms", "errors",
                            "cost $", "$ per 1k req"],
          [[r.group, r.requests, r.prompt_tokens, r.completion_tokens, _ms(r.p50_ms), _ms(r.p95_ms),
            f"{r.error_rate:.1%}", f"{r.cost_usd:.6f}", f"{r.cost_per_1k_usd:.4f}"] for r in rows])
