"""The fleet page: a live web dashboard served by the hub under /ui, on the OpenAI API's port.

    GET  /ui                  the page (the login form, 401, without a session)
    GET  /ui/login            the login form;  POST /ui/login  (api_key) starts a session
    POST /ui/logout           ends it
    GET  /ui/events           server-sent events: each part of the page as HTML, when it changes
    GET  /ui/requests/{id}    one request and the router's decision: every candidate, why it lost
    GET  /ui/devices/{id}/plans   the Pareto front of splitting the hub's model with that device
    POST /ui/devices/{id}/revoke   revoke a device (its credential and broker login)
    POST /ui/tokens           a new enrollment token, as a file download (never rendered into a page)
    GET  /ui/static/…         the style sheet and the script

Server-rendered HTML (Jinja2, autoescaped) and a small script that swaps in the parts the event
stream sends; nothing is fetched from elsewhere and there is no build step. The parts are rendered
from `views` (pure functions over the registry, the fleet and the hub's journal) at most every
`refresh_s`, and sent only when they changed, so that an idle page costs one render a second.

Security: a login with one of the hub's API keys gets a random session id in an HttpOnly,
SameSite=Strict cookie (`sessions`); every POST needs the session's CSRF token (the login form its
own double-submitted one), and a POST whose Origin is another site is refused. Responses carry a
Content-Security-Policy that allows only this page's own script and style sheet.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from cloud_hub import auth
from cloud_hub.errors import HubError, NotFound
from cloud_hub.estimates import split_plan
from cloud_hub.placements import model_cost
from cloud_hub.registry import Registry
from cloud_hub.service import HubService
from cloud_hub.split_plans import SplitPlans, serves, split_spec
from cloud_hub.ui import plots, views
from cloud_hub.ui.sessions import LOGIN_COOKIE, SESSION_COOKIE, Sessions, UiSession, same_secret
from partitioner.split import Plan
from tandem.v1 import tandem_pb2 as pb

HERE = Path(__file__).parent
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes Chromium send `Origin: null` on our own POSTs
    "Cache-Control": "no-store",
}
RECENT = 30
"""Requests listed on the page (the journal keeps more, for the plots and for opening one)."""


class FleetPage:
    """The page's state: its templates, its logins, and when it is closing (the hub stopping)."""

    def __init__(self, registry: Registry, service: HubService, hub_address: str, refresh_s: float = 1.0) -> None:
        self.registry, self.service, self.hub_address, self.refresh_s = registry, service, hub_address, refresh_s
        self.sessions = Sessions()
        self.closing = asyncio.Event()
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True), auto_reload=False
        )

    def render(self, template: str, /, **context: object) -> str:
        return self.env.get_template(template).render(**context)

    # -- the parts ---------------------------------------------------------------------------------

    def names(self) -> dict[str, str]:
        """Device id -> the name it enrolled with."""
        return {d.device_id: d.name for d in self.registry.devices()}

    def parts(self, session: UiSession, include_plots: bool = True) -> dict[str, str]:
        """Each live part of the page, rendered."""
        service = self.service
        devices = self.registry.devices()
        names = {d.device_id: d.name for d in devices}
        cloud = service.placements.source("cloud")
        info = service.cloud.model_info() if service.cloud is not None else None
        profile = getattr(getattr(cloud, "profile", None), "name", "")
        fleet = views.fleet_rows(devices, service.fleet, info, profile, getattr(cloud, "inflight", 0))
        records = list(service.journal.records)
        recent = service.journal.recent(RECENT)
        done = [r for r in records if r.outcome != "running"]
        kept = [r.kept for r in done]
        summary = {
            "online": sum(d.status == "online" for d in devices),
            "devices": len(devices),
            "requests": len(done),
            "served": sum(r.outcome == "ok" for r in done),
            "budgeted": sum(k is not None for k in kept),
            "kept": sum(k is True for k in kept),
            "refused": sum(r.outcome == "budget_unsatisfiable" for r in done),
            "failed": sum(r.outcome not in ("ok", "budget_unsatisfiable", "cancelled") for r in done),
        }
        out = {
            "summary": self.render("_summary.html", summary=summary),
            "fleet": self.render("_fleet.html", fleet=fleet, csrf=session.csrf),
            "requests": self.render("_requests.html", requests=views.request_rows(recent, names)),
        }
        if include_plots:
            data = views.series(records, names)
            charts = [
                plots.line_chart("Time to first token, by device", "ms", data["ttft"]),
                plots.line_chart("Time to first token, by placement kind", "ms", data["ttft_kind"]),
                plots.line_chart("TTFT prediction error, by device", "% of predicted", data["error"], True),
                plots.line_chart("Energy per request, by device", "J", data["energy"]),
                plots.line_chart("Energy per request, by placement kind", "J", data["energy_kind"]),
            ]
            out["plots"] = self.render("_plots.html", plots=charts)
        return out

    async def stream(self, request: Request, sid: str) -> AsyncIterator[str]:
        """The event stream: every part at once, then each again when it changes. Ends when the session
        ends (a `bye` event), the client goes away or the hub stops."""
        sent: dict[str, str] = {}
        seen, next_full, next_plots = -1, 0.0, 0.0
        yield "retry: 1000\n\n"
        while not self.closing.is_set():
            session = self.sessions.get(sid)
            if session is None or not self._key_valid(session):
                yield "event: bye\ndata: \n\n"
                return
            now = time.monotonic()
            version = self.service.journal.version
            if version != seen or now >= next_full:
                with_plots = now >= next_plots
                for name, html in self.parts(session, with_plots).items():
                    if sent.get(name) != html:
                        sent[name] = html
                        yield f"event: {name}\n" + "".join(f"data: {line}\n" for line in html.split("\n")) + "\n"
                seen, next_full = version, now + self.refresh_s
                if with_plots:
                    next_plots = now + 2 * self.refresh_s
            if await request.is_disconnected():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), self.refresh_s / 4)

    def plans(self, device_id: str) -> tuple[list[tuple[int, Plan]], int | None, pb.ModelInfo]:
        """(k, plan) for every cut k = 0..N of the hub's own model between `device_id` and the hub, for
        SplitPlans.REFERENCE, and the cut the split source holds now (None: none). Raises LookupError
        when the device is offline, or the hub serves no model the device serves at its precision."""
        cloud, backend = self.service.placements.source("cloud"), self.service.cloud
        s = self.service.fleet.sessions.get(device_id)
        if s is None or s.closed:
            raise LookupError(f"device {device_id!r} is not online")
        profile = getattr(cloud, "profile", None)
        if backend is None or profile is None:
            raise LookupError("the hub serves no model of its own: nothing to split with")
        info = backend.model_info()
        if not serves(s, info):
            raise LookupError(f"device {device_id!r} does not serve {info.name} at {info.quant}, as the hub does")
        spec, _ = split_spec(self.service.fleet, [s], info, profile)
        cost = model_cost(info.config_json, info.weight_bytes)
        plans = [
            (k, split_plan(replace(spec, cuts=(k,)), cost, *SplitPlans.REFERENCE)) for k in range(info.n_layers + 1)
        ]
        source = self.service.placements.source("split")
        return plans, source.current_cut(device_id) if isinstance(source, SplitPlans) else None, info

    # -- auth --------------------------------------------------------------------------------------

    def _key_valid(self, session: UiSession) -> bool:
        return self.registry.known_api_key(session.key_lookup)

    def session_of(self, request: Request) -> UiSession | None:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        return session if session is not None and self._key_valid(session) else None


def _login_page(page: FleetPage, status: int = 401, error: str = "") -> HTMLResponse:
    """The login form with a fresh double-submit CSRF value (cookie and field)."""
    csrf = secrets.token_urlsafe(24)
    response = HTMLResponse(page.render("login.html", csrf=csrf, error=error), status_code=status)
    response.set_cookie(LOGIN_COOKIE, csrf, httponly=True, samesite="strict", path="/ui", max_age=3600)
    return response


def _refused() -> Response:
    return Response("refused: missing or wrong CSRF token", status_code=403, media_type="text/plain")


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the first value of each)."""
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _cross_site(request: Request) -> bool:
    """An Origin header naming another host than the one asked (a browser's cross-site POST)."""
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host", "")


def add_ui(app: FastAPI, registry: Registry, service: HubService, hub_address: str) -> FleetPage:
    """Mount the fleet page on the hub's HTTP app; returns its state (Hub.stop closes it)."""
    page = FleetPage(registry, service, hub_address)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        if request.url.path == "/ui" or request.url.path.startswith("/ui/"):
            for k, v in HEADERS.items():
                response.headers.setdefault(k, v)
        return response

    async def checked_post(request: Request) -> tuple[UiSession | None, dict[str, str], Response | None]:
        """A state-changing request's session and form, or the refusal: 401 without a session, 403
        without its CSRF token or from another site's page."""
        form = await _form(request)
        session = page.session_of(request)
        if session is None:
            return None, form, _login_page(page, error="Log in first.")
        token = form.get("csrf") or request.headers.get("x-csrf-token")
        if _cross_site(request) or not same_secret(session.csrf, token):
            return session, form, _refused()
        return session, form, None

    @app.get("/ui", response_class=HTMLResponse)
    async def fleet_page(request: Request) -> Response:
        session = page.session_of(request)
        if session is None:
            return _login_page(page)
        parts = {name: Markup(html) for name, html in page.parts(session).items()}  # rendered, escaped
        return HTMLResponse(page.render("fleet.html", csrf=session.csrf, parts=parts, live=True))

    @app.get("/ui/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        if page.session_of(request) is not None:
            return RedirectResponse("/ui", status_code=303)
        return _login_page(page, status=200)

    @app.post("/ui/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        if _cross_site(request) or not same_secret(request.cookies.get(LOGIN_COOKIE, ""), form.get("csrf")):
            return _refused()
        try:
            registry.check_api_key(form.get("api_key", "").strip())
        except HubError:
            return _login_page(page, error="That API key is not one of this hub's.")
        session = page.sessions.create(auth.lookup_key(form["api_key"].strip()))
        response = RedirectResponse("/ui", status_code=303)
        secure = request.url.scheme == "https"
        response.set_cookie(SESSION_COOKIE, session.sid, httponly=True, samesite="strict", path="/ui", secure=secure)
        response.delete_cookie(LOGIN_COOKIE, path="/ui")
        return response

    @app.post("/ui/logout")
    async def logout(request: Request) -> Response:
        session, _, refused = await checked_post(request)
        if refused is not None:
            return refused
        assert session is not None
        page.sessions.end(session.sid)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/ui")
        return response

    @app.get("/ui/events")
    async def events(request: Request) -> Response:
        session = page.session_of(request)
        if session is None:  # no data at all: not even an empty part
            return Response("login required", status_code=401, media_type="text/plain")
        return StreamingResponse(
            page.stream(request, session.sid), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
        )

    @app.get("/ui/requests/{request_id}", response_class=HTMLResponse)
    async def request_page(request_id: str, request: Request) -> Response:
        session = page.session_of(request)
        if session is None:
            return _login_page(page)
        record = service.journal.get(request_id)
        if record is None:
            return Response(f"no request {request_id!r} in the hub's journal", status_code=404, media_type="text/plain")
        names = page.names()
        row = views.request_rows([record], names)[0]
        candidates = views.decision_rows(record, names)
        return HTMLResponse(
            page.render(
                "request.html",
                csrf=session.csrf,
                row=row,
                record=record,
                candidates=candidates,
                taken=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(record.at)),
            )
        )

    @app.get("/ui/devices/{device_id}/plans", response_class=HTMLResponse)
    async def plans_page(device_id: str, request: Request) -> Response:
        """Every cut of the hub's model between this device and the hub, predicted for the split
        source's reference request from what the hub measured: the front of TTFT against edge energy."""
        session = page.session_of(request)
        if session is None:
            return _login_page(page)
        try:
            cuts, chosen, info = page.plans(device_id)
        except LookupError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        names = page.names()
        chart = plots.scatter(
            f"{info.name}: {names.get(device_id, device_id)} then the hub, every cut", "TTFT ms", "edge energy J",
            [(f"k={k}", p.ttft_ms, p.edge_energy_j) for k, p in cuts], f"k={chosen}" if chosen is not None else "",
        )  # fmt: skip
        on = plots.front([(p.ttft_ms, p.edge_energy_j) for _, p in cuts])
        rows = [(k, p, f) for (k, p), f in zip(cuts, on, strict=True)]
        return HTMLResponse(
            page.render("plans.html", csrf=session.csrf, name=names.get(device_id, device_id), device=device_id,
                        model=info.name, chart=chart, rows=rows, chosen=chosen, reference=SplitPlans.REFERENCE)
        )  # fmt: skip

    @app.post("/ui/devices/{device_id}/revoke")
    async def revoke(device_id: str, request: Request) -> Response:
        _, _, refused = await checked_post(request)
        if refused is not None:
            return refused
        try:
            await asyncio.to_thread(registry.revoke, device_id)
        except NotFound as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        return RedirectResponse("/ui", status_code=303)

    @app.post("/ui/tokens")
    async def new_token(request: Request) -> Response:
        _, _, refused = await checked_post(request)
        if refused is not None:
            return refused
        token = registry.create_token()
        text = (
            f"# A one-time enrollment token for the Tandem hub at {page.hub_address}, valid "
            f"{registry.token_ttl_s / 60:.0f} minutes.\n# On the device:\n"
            f"tandem agent run --hub {page.hub_address} --token {token} --profile PROFILE --model MODEL --name NAME\n"
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Response(
            text,
            media_type="text/plain",
            headers={"Content-Disposition": f'attachment; filename="tandem-enroll-{stamp}.txt"'},
        )

    return page
