"""`git tq serve`: a read-only live view of the queue in a browser (Starlette on uvicorn).

Security, as Jupyter does it: it listens on 127.0.0.1 unless told otherwise, prints a URL
that carries a random token (secrets.token_urlsafe), and answers every request without
that token 401 and nothing else (the token comes as `?token=`, then as the cookie the
first visit sets, or as an `Authorization: Bearer` header). Every route is a GET: nothing
here changes a job. Pages hold no inline script; the Content-Security-Policy allows
scripts from this server only and connections to it only.

Pages: `/` the GPUs with what runs and waits on each (`top`'s content), `/jobs` every
job, a page at a time (from the rows cache), `/job/NAME` one job (command, code against
its source commit, log tail and curves, both followed live), `/compare?jobs=...`. The
live parts poll small JSON routes under `/api/`. Service calls run one at a time (a lock):
a page waits for another's git processes instead of racing them for the caches.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Callable, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from git_tq import service
from git_tq.errors import TqError, UnknownJob, UsageError
from git_tq.safetext import visible
from git_tq.web import pages, render

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()),
           (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"),
           (b"x-frame-options", b"DENY")]
REFUSED = (b"401 Unauthorized: this git tq serve needs its token. Open the URL it printed "
           b"(http://HOST:PORT/?token=...).\n")
LOG_CHUNK = 64 * 1024  # bytes of a log one poll returns at most
DEFAULT_PORT = 8765
BOARD_MAX_AGE = 10.0  # seconds a board stays shown while no job's record moves


class TokenGate:
    """ASGI middleware: a request goes through only with the token; the first visit with
    `?token=` gets the cookie and is sent on to the same address without the token (so
    it stays out of the history and of every later link). Security headers on every
    answer."""

    def __init__(self, app: ASGIApp, token: str, cookie: str) -> None:
        self.app, self.token, self.cookie = app, token, cookie

    def _given(self, scope: Scope) -> tuple[bool, bool]:
        """(the token is right, it came in the query string)"""
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token", [])
        if given:
            return secrets.compare_digest(given[-1].encode(), self.token.encode()), True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return secrets.compare_digest(auth[7:].strip(), self.token.encode()), False
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == self.cookie.encode():
                return secrets.compare_digest(value, self.token.encode()), False
        return False, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ok, in_query = self._given(scope)
        if not ok:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"www-authenticate", b"Bearer"),
                                    (b"cache-control", b"no-store"), *HEADERS]})
            await send({"type": "http.response.body", "body": REFUSED})
            return
        if in_query and scope["method"] in ("GET", "HEAD"):
            rest = [(k, v) for k, v in urllib.parse.parse_qsl(
                scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
                if k != "token"]
            # one leading slash: `//host/` would send the browser to another site
            where = "/" + urllib.parse.quote(scope["path"].lstrip("/")) + (
                "?" + urllib.parse.urlencode(rest) if rest else "")
            cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", where.encode("latin-1")),
                                    (b"set-cookie", cookie.encode()),
                                    (b"cache-control", b"no-store"), *HEADERS]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, guarded)


class Views:
    """The routes: each opens the repository afresh (settings may change while it
    serves) and calls `pages`/`service` under one lock."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd
        self.lock = threading.Lock()
        self.repo = ""
        self.board_cache: Optional[tuple[str, float, str]] = None  # refs, when, HTML

    @contextmanager
    def context(self) -> Iterator[service.Context]:
        with self.lock:
            ctx = service.Context.open(self.cwd)
            self.repo = self.repo or service.repo_name(ctx.repo.common_dir)
            yield ctx

    def html(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        values.setdefault("repo", self.repo)
        values.setdefault("plots", False)
        values.setdefault("nav", "")
        values.setdefault("live", False)
        values.setdefault("data", {"kind": "none"})
        return HTMLResponse(render.page(template, job_url=job_url, diff_class=diff_class,
                                        **values),
                            status_code=status, headers={"cache-control": "no-store"})

    def failure(self, exc: TqError) -> HTMLResponse:
        status = 404 if isinstance(exc, UnknownJob) else 400
        return self.html("error.html", status, title="error", message=str(exc))

    def board(self, request: Request) -> Response:
        with self.context() as ctx:
            board = service.dashboard(ctx)
        return self.html("board.html", title="GPUs and queue", nav="board", board=board,
                         data={"kind": "board", "refresh": "/api/board"})

    def board_part(self, request: Request) -> Response:
        """The board for a page's refresh: made again when a job's record moved (one
        `for-each-ref`) or after BOARD_MAX_AGE seconds (times, GPU use, log lines), not
        on every poll: at 10,000 jobs a board costs ~0.5 s, as `top` does."""
        with self.context() as ctx:
            key = service.refs_signature(ctx)
            cached = self.board_cache
            now = time.monotonic()
            if cached is None or cached[0] != key or now - cached[1] > BOARD_MAX_AGE:
                html = render.page("board_part.html", board=service.dashboard(ctx),
                                   job_url=job_url)
                cached = self.board_cache = (key, now, html)
        return HTMLResponse(cached[2], headers={"cache-control": "no-store"})

    def jobs(self, request: Request) -> Response:
        q = request.query_params
        try:
            number = int(q.get("page", "1"))
        except ValueError:
            number = 1
        state, tag = q.get("state", ""), q.get("tag", "")
        try:
            with self.context() as ctx:
                listing = pages.job_list(ctx, number, state=state, tag=tag)
        except TqError as exc:
            return self.failure(exc)

        def page_url(n: int) -> str:
            wanted = {"page": n, **({"state": state} if state else {}),
                      **({"tag": tag} if tag else {})}
            return "/jobs?" + urllib.parse.urlencode(wanted)

        return self.html("jobs.html", title="jobs", nav="jobs", listing=listing,
                         states=("active", *pages.STATES), page_url=page_url,
                         data={"kind": "jobs"})

    def job(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            with self.context() as ctx:
                page = pages.job_page(ctx, name)
        except TqError as exc:
            return self.failure(exc)
        job = page.detail.view.job
        quoted = urllib.parse.quote(job.name, safe="")
        return self.html("job.html", title=f"job {job.name}", page=page, plots=True,
                         live=page.active,
                         data={"kind": "job", "job": job.name,
                               "curves": f"/api/curves?jobs={quoted}",
                               "log": f"/api/log/{quoted}"})

    def compare(self, request: Request) -> Response:
        tokens = request.query_params.getlist("jobs")
        if not tokens:
            return self.failure(UsageError("no job given: pick jobs on the job list"))
        try:
            with self.context() as ctx:
                table = pages.comparison(ctx, tokens)
        except TqError as exc:
            return self.failure(exc)
        query = urllib.parse.urlencode([("jobs", name) for name in table.jobs])
        return self.html("compare.html", title="compare", table=table, links=True, plots=True,
                         live=table.active,
                         data={"kind": "compare", "curves": f"/api/curves?{query}"})

    def curves(self, request: Request) -> Response:
        tokens = request.query_params.getlist("jobs")
        metrics = request.query_params.getlist("metrics") or None
        try:
            if not tokens:
                raise UsageError("no job given")
            with self.context() as ctx:
                data = pages.curves_json(ctx, tokens, metrics)
        except TqError as exc:
            return JSONResponse({"error": visible(str(exc))}, status_code=400)
        return JSONResponse(data, headers={"cache-control": "no-store"})

    def log(self, request: Request) -> Response:
        given = request.query_params.get("offset")
        offset: Optional[int] = None
        if given is not None:
            if not (given.isascii() and given.isdigit() and len(given) < 19):
                return JSONResponse({"error": "bad offset"}, status_code=400)
            offset = int(given)
        try:
            with self.context() as ctx:
                job = ctx.store.resolve(request.path_params["name"])
                piece = service.log_piece(ctx, job, offset, LOG_CHUNK)
        except TqError as exc:
            return JSONResponse({"error": visible(str(exc))}, status_code=404)
        text = piece.data.decode("utf-8", errors="surrogateescape")
        return JSONResponse({"start": piece.start, "end": piece.end, "ended": piece.ended,
                             "stored": piece.stored, "text": visible(text, newlines=True)},
                            headers={"cache-control": "no-store"})

    def static(self, request: Request) -> Response:
        path = render.static_path(request.path_params["name"])
        if not path or not os.path.isfile(path):
            return Response("not found\n", status_code=404, media_type="text/plain")
        return FileResponse(path, headers={"cache-control": "private, max-age=3600"})


def job_url(name: str) -> str:
    return "/job/" + urllib.parse.quote(name, safe="")


def diff_class(line: str) -> str:
    """The style of one line of a patch."""
    if line.startswith(("+++", "---", "diff ", "index ", "similarity", "rename ",
                        "new file", "deleted file", "old mode", "new mode")):
        return "meta"
    return {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "")


def application(cwd: str, token: str, cookie: str) -> ASGIApp:
    views = Views(cwd)
    routes = [
        Route("/", views.board),
        Route("/jobs", views.jobs),
        Route("/job/{name:str}", views.job),
        Route("/compare", views.compare),
        Route("/api/board", views.board_part),
        Route("/api/curves", views.curves),
        Route("/api/log/{name:str}", views.log),
        Route("/static/{name:str}", views.static),
    ]
    return TokenGate(Starlette(routes=routes), token, cookie)


def listen(host: str, port: Optional[int]) -> socket.socket:
    """A listening socket on host:port; with no port, DEFAULT_PORT, else any free one."""
    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tries = [address] if port is not None else [(address[0], DEFAULT_PORT, *address[2:]),
                                               (address[0], 0, *address[2:])]
    for i, where in enumerate(tries):
        try:
            sock.bind(where)
            break
        except OSError as exc:
            if i + 1 < len(tries):
                continue
            sock.close()
            raise UsageError(f"cannot listen on {host} port {where[1]}: {exc.strerror} "
                             "(--port 0 takes any free port)") from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket, token: str) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = socket.gethostname()
    return f"http://{shown}:{port}/?token={token}"


def serve(cwd: str, host: str, port: Optional[int], announce: Callable[[str], None]) -> None:
    """Serve until Ctrl-C (or SIGTERM); `announce` gets the URL to open."""
    import uvicorn

    from git_tq import rows

    # The caches the first pages read (the job list's rows, the records the board lists)
    # are made before the URL is shown.
    ctx = service.Context.open(cwd)
    rows.every(ctx, json=False)
    ctx.store.listing()
    sock = listen(host, port)
    token = secrets.token_urlsafe(32)
    cookie = f"tq-token-{sock.getsockname()[1]}"
    config = uvicorn.Config(application(cwd, token, cookie), log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                            server_header=False)
    announce(url_of(sock, token))
    uvicorn.Server(config).run(sockets=[sock])
