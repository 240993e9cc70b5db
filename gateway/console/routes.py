"""The console's pages (GET, any key) and actions (POST, admin keys), under /ui.

Every action calls what the CLI and the admin API call (``Registry.promote``, ``rollback``,
``RolloutService.start`` ...) acting as the signed-in key, so it is checked and audited the same way.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic_core import to_jsonable_python

from loragate.registry import GateReport, GateRefused, InvalidInput, Registry, RegistryError

from ..auth import Caller
from ..errors import registry_status, validation_problem
from ..rollouts import Ramp, RolloutService, Thresholds
from . import views
from .auth import COOKIE, INVALID_KEY, ConsoleContext, SignInNeeded, console_context, same_origin, viewer

HERE = FilePath(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["jsonable"] = to_jsonable_python  # models and datetimes, for the charts' embedded JSON
router = APIRouter(prefix="/ui", include_in_schema=False)
# Scripts and styles come from this server only: a page can load nothing from a CDN, and no
# injected inline script runs. Plotly sets inline styles on the charts it draws.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "frame-ancestors 'none'; form-action 'self'")
Viewer = Annotated[Caller, Depends(viewer)]
Context = Annotated[ConsoleContext, Depends(console_context)]
Reason = Annotated[str | None, Form()]
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]
VersionField = Annotated[int, Form(ge=1, le=2**31 - 1)]


def render(request: Request, template: str, who: Caller | None, ctx: ConsoleContext, *, status: int = 200,
           **values: Any) -> HTMLResponse:
    response = templates.TemplateResponse(request, template, {"who": who, "refresh_s": ctx.refresh_s, **values},
                                          status_code=status)
    response.headers["content-security-policy"] = CSP
    return response


def install(app: FastAPI, ctx: ConsoleContext) -> None:
    """Mount the console on ``app`` (the gateway's, or `loragate ui`'s)."""
    app.state.console = ctx
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="console-static")

    as_json = app.exception_handlers[RequestValidationError]

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        """A form a person filled in wrongly gets a page saying what; the API keeps its JSON errors."""
        if not request.url.path.startswith("/ui"):
            return await as_json(request, exc)
        message, _ = validation_problem(exc, skip=("body", "query", "path"))
        return render(request, "result.html", None, ctx, status=400, title="Not done", back="/ui", error=message)

    @app.exception_handler(SignInNeeded)
    async def _sign_in(request: Request, exc: SignInNeeded) -> Response:
        if request.method == "GET":  # a browser comes back here once signed in
            return RedirectResponse(f"/ui/login?{urlencode({'next': request.url.path})}", status_code=303)
        return render(request, "login.html", None, ctx, status=401, message=exc.message, next="/ui")


@router.get("/vendor/plotly.min.js")
async def plotly_js() -> FileResponse:
    """plotly.js as the installed plotly package ships it."""
    spec = importlib.util.find_spec("plotly")
    assert spec is not None and spec.origin is not None
    return FileResponse(FilePath(spec.origin).parent / "package_data" / "plotly.min.js", media_type="text/javascript",
                        headers={"cache-control": "public, max-age=86400"})


# -- signing in ----------------------------------------------------------------------------------

@router.get("/login")
async def login_page(request: Request, ctx: Context, next: str = "/ui") -> HTMLResponse:
    return render(request, "login.html", None, ctx, message="", next=next)


@router.post("/login")
async def login(request: Request, ctx: Context, key: Annotated[str, Form()],
                next: Annotated[str, Form()] = "/ui") -> Response:
    key = key.strip()
    found = await asyncio.to_thread(ctx.keys.verify, key)
    if found is None:
        return render(request, "login.html", None, ctx, status=401, message=INVALID_KEY, next=next)
    # Only back into the console: a `next` naming another site would make this an open redirect.
    target = next if next.startswith("/ui") else "/ui"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/ui",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout() -> RedirectResponse:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- pages ---------------------------------------------------------------------------------------

async def _page(request: Request, who: Caller, ctx: ConsoleContext, template: str, load: Callable[[], Any],
                **values: Any) -> HTMLResponse:
    """Render ``template`` with what ``load`` reads (in a thread), or the registry's refusal as a page."""
    try:
        page = await asyncio.to_thread(load)
    except RegistryError as exc:
        return render(request, "result.html", who, ctx, status=registry_status(exc), title="Not shown", back="/ui",
                      error=str(exc))
    return render(request, template, who, ctx, page=page, **values)


@router.get("")
async def index(request: Request, who: Viewer, ctx: Context) -> HTMLResponse:
    return await _page(request, who, ctx, "index.html", lambda: views.adapters(ctx.registry, ctx.rollouts))


@router.get("/adapters/{name}")
async def adapter(request: Request, name: str, who: Viewer, ctx: Context) -> HTMLResponse:
    return await _page(request, who, ctx, "adapter.html", lambda: views.adapter_page(ctx.registry, ctx.rollouts, name))


@router.get("/adapters/{name}/versions/{version}")
async def version(request: Request, name: str, version: VersionNumber, who: Viewer, ctx: Context) -> HTMLResponse:
    return await _page(request, who, ctx, "version.html", lambda: views.version_page(ctx.registry, name, version))


@router.get("/adapters/{name}/aliases")
async def aliases(request: Request, name: str, who: Viewer, ctx: Context) -> HTMLResponse:
    return await _page(request, who, ctx, "aliases.html", lambda: views.alias_history(ctx.registry, name), name=name)


@router.get("/adapters/{name}/rollout")
async def rollout(request: Request, name: str, who: Viewer, ctx: Context) -> HTMLResponse:
    return await _page(request, who, ctx, "rollout.html", lambda: views.rollout_page(ctx.rollouts, name), name=name)


@router.get("/adapters/{name}/rollout.json")
async def rollout_data(name: str, _: Viewer, ctx: Context) -> views.RolloutPage:
    """What the rollout page redraws from while it is open (errors as the API's JSON)."""
    return await asyncio.to_thread(views.rollout_page, ctx.rollouts, name)


@router.get("/cost")
async def cost(request: Request, who: Viewer, ctx: Context, since: str = "24h",
               by: Literal["adapter", "version", "arm", "key"] = "adapter") -> HTMLResponse:
    return await _page(request, who, ctx, "cost.html",
                       lambda: views.cost(ctx.registry, None if since == "all" else since, by), since=since, by=by)


@router.get("/engines")
async def engines(request: Request, who: Viewer, ctx: Context) -> HTMLResponse:
    """What the gateway serves on: each backend's engines and, for a pool, each replica and what it holds."""
    return render(request, "engines.html", who, ctx, page=await ctx.engines() if ctx.engines else None)


# -- actions -------------------------------------------------------------------------------------

async def _act(request: Request, who: Caller, ctx: ConsoleContext, title: str, back: str,
               action: Callable[[Registry, RolloutService], Any]) -> HTMLResponse:
    """Run one admin action as the signed-in key and show its outcome, refusals included."""
    def result(status: int, **values: Any) -> HTMLResponse:
        return render(request, "result.html", who, ctx, status=status, title=title, back=back, **values)

    if not same_origin(request):
        return result(403, error="refused: this form was not posted from the console")
    if not who.admin:
        return result(403, error="refused: this action needs an admin key")
    registry = ctx.registry.acting_as(who.actor)
    try:
        outcome = await asyncio.to_thread(action, registry, RolloutService(registry))
    except GateRefused as refused:
        return result(409, error=str(refused), reasons=refused.reasons)
    except RegistryError as exc:
        return result(registry_status(exc), error=str(exc))
    return result(200, report=outcome if isinstance(outcome, GateReport) else None)



@router.post("/adapters/{name}/promote")
async def promote(request: Request, name: str, who: Viewer, ctx: Context, version: VersionField,
                  to: Annotated[str, Form()] = "production", reason: Reason = None) -> HTMLResponse:
    return await _act(request, who, ctx, f"promote {name}@{version} to {to}", f"/ui/adapters/{name}/versions/{version}",
                      lambda registry, _: registry.promote(f"{name}@{version}", to=to, reason=reason or None))


@router.post("/adapters/{name}/rollback")
async def rollback(request: Request, name: str, who: Viewer, ctx: Context,
                   alias: Annotated[str, Form()] = "production", reason: Reason = None) -> HTMLResponse:
    return await _act(request, who, ctx, f"roll {name}@{alias} back", f"/ui/adapters/{name}/aliases",
                      lambda registry, _: registry.rollback(name, alias=alias, reason=reason or None))


@router.post("/adapters/{name}/rollout/start")
async def start_rollout(request: Request, name: str, who: Viewer, ctx: Context, candidate: VersionField,
                        weight: Annotated[float, Form()] = 5.0,
                        mode: Annotated[Literal["split", "shadow"], Form()] = "split",
                        ramp: Annotated[str, Form()] = "", min_requests: Annotated[int, Form(ge=1)] = 20,
                        max_error_rate: Annotated[float, Form(ge=0, le=1)] = 0.05,
                        max_latency_ratio: Annotated[float, Form(gt=0)] = 1.5) -> HTMLResponse:
    def start(_: Registry, rollouts: RolloutService) -> None:
        try:
            steps = Ramp([float(w) for w in ramp.replace(",", " ").split()]) if ramp.strip() else None
        except ValueError:
            raise InvalidInput(f"a ramp is a list of weights such as 5,25,50,100, not {ramp!r}") from None
        thresholds = Thresholds(min_requests=min_requests, max_error_rate=max_error_rate,
                                max_latency_ratio=max_latency_ratio)
        rollouts.start(name, candidate, weight, thresholds, steps, mode=mode)

    return await _act(request, who, ctx, f"start a {mode} rollout of {name}@{candidate}",
                      f"/ui/adapters/{name}/rollout", start)


@router.post("/adapters/{name}/rollout/weight")
async def rollout_weight(request: Request, name: str, who: Viewer, ctx: Context,
                         weight: Annotated[float, Form()]) -> HTMLResponse:
    return await _act(request, who, ctx, f"set {name}'s rollout weight to {weight:g}%", f"/ui/adapters/{name}/rollout",
                      lambda _, rollouts: rollouts.set_weight(name, weight))


@router.post("/adapters/{name}/rollout/promote")
async def rollout_promote(request: Request, name: str, who: Viewer, ctx: Context, reason: Reason = None) -> HTMLResponse:
    return await _act(request, who, ctx, f"promote {name}'s candidate", f"/ui/adapters/{name}/rollout",
                      lambda registry, rollouts: rollouts.promote(name, reason=reason or None, actor=registry.actor))


@router.post("/adapters/{name}/rollout/abort")
async def rollout_abort(request: Request, name: str, who: Viewer, ctx: Context, reason: Reason = None) -> HTMLResponse:
    return await _act(request, who, ctx, f"abort {name}'s rollout", f"/ui/adapters/{name}/rollout",
                      lambda _, rollouts: rollouts.abort(name, reason=reason or None))
