"""The review web app (ASGI, Starlette): ``fieldreid review`` serves it; the lab server mounts it.

Security, by default:

* **A token on every session.** The app has a secret token (``--token``, ``$FIELDREID_REVIEW_TOKEN``, else a
  random one per start). Opening ``/?token=...`` (the link ``fieldreid review`` opens or prints) sets an
  HttpOnly, SameSite=Strict session cookie and redirects to the page without the token; every other
  request needs that cookie. Other users of the machine, and web pages in the same browser, get nothing.
* **Loopback only**, unless the command is given ``--host`` with a token of the user's own; on loopback
  the ``Host`` header must be a loopback name (DNS rebinding).
* **CSRF**: a state-changing request is a JSON POST carrying the page's CSRF token in ``X-CSRF-Token``
  (derived from the secret, compared in constant time), from the same origin when the browser says one.
* **No request path becomes a file path**: pictures are named by content hashes and database ids
  (:mod:`fieldreid.review.images`); static files come from a fixed list inside the package.
* Strict Content-Security-Policy (no inline script, nothing from other origins: the page works offline),
  ``no-referrer``, ``nosniff``, no framing, bodies over 64 KiB refused.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import secrets
import threading
from importlib import resources
from pathlib import Path

from fieldreid.errors import FieldreidError, missing_extra

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("starlette", "review", "the review web app") from exc

TOKEN_ENV = "FIELDREID_REVIEW_TOKEN"
MAX_BODY = 64 * 1024
STATIC = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _derive(token: str, what: str) -> str:
    return hmac.new(token.encode("utf-8"), what.encode("utf-8"), hashlib.sha256).hexdigest()


class ReviewApp:
    """State shared by the routes: the review source, its pictures, one lock around every database use."""

    def __init__(self, out: str | Path, gallery_path: str | Path | None = None, *, token: str | None = None,
                 who: str | None = None, qc_percent: float = 20.0, loopback_only: bool = True) -> None:
        from fieldreid.gallery.store import Gallery, default_who
        from fieldreid.review.images import Pictures
        from fieldreid.review.queue import ReviewSource
        from fieldreid.watch import RESULTS_DB, StateDB

        out = Path(out)
        if gallery_path is None:
            probe = StateDB(out / RESULTS_DB, readonly=True)
            try:
                recorded = probe.meta("gallery")
            finally:
                probe.close()
            if not recorded:
                raise FieldreidError(f"{out} does not say which gallery its decisions went to; pass --gallery.")
            gallery_path = recorded
        self.token = token or secrets.token_urlsafe(24)
        self.session = _derive(self.token, "session")
        self.csrf = _derive(self.token, "csrf")
        self.cookie = "fieldreid_review_" + _derive(self.token, "cookie")[:8]
        self.who = who or default_who()
        self.loopback_only = loopback_only
        self.lock = threading.Lock()
        self.gallery = Gallery(gallery_path, create=False, who=self.who)
        try:
            self.source = ReviewSource(out, self.gallery, qc_percent=qc_percent)
        except BaseException:
            self.gallery.close()
            raise
        self.pictures = Pictures(self.source)
        self.out = out

    def close(self) -> None:
        self.source.close()
        self.gallery.close()


def _page(app: ReviewApp) -> str:
    text = resources.files("fieldreid.review").joinpath("static/index.html").read_text(encoding="utf-8")
    return (text.replace("{{csrf}}", html.escape(app.csrf)).replace("{{title}}", html.escape(app.source.title))
            .replace("{{who}}", html.escape(app.who)))


def _static(name: str) -> bytes:
    return resources.files("fieldreid.review").joinpath(f"static/{name}").read_bytes()


def _headers(extra: dict | None = None) -> dict:
    h = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
         "X-Frame-Options": "DENY", "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-store"}
    h.update(extra or {})
    return h


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_headers())


def create_app(out: str | Path, gallery: str | Path | None = None, *, token: str | None = None,
               who: str | None = None, qc_percent: float = 20.0, loopback_only: bool = True) -> Starlette:
    """The review app over watch output folder ``out`` and its gallery (``gallery``, default: the one
    recorded in ``out/results.db``). ``app.state.review`` holds the :class:`ReviewApp` (its ``token``).

    >>> app = create_app("results/")                      # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8765)     # doctest: +SKIP
    """
    from fieldreid.review import actions
    from fieldreid.review.queue import Filters, NotFound

    state = ReviewApp(out, gallery, token=token, who=who, qc_percent=qc_percent, loopback_only=loopback_only)

    def host_ok(request: Request) -> bool:
        if not state.loopback_only:
            return True
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return is_loopback(name)

    def authed(request: Request) -> bool:
        value = request.cookies.get(state.cookie, "")
        return hmac.compare_digest(value.encode(), state.session.encode())

    def guard(fn, write: bool = False):
        async def endpoint(request: Request):
            if not host_ok(request):
                return _error(421, "This review server answers only to its loopback address.")
            if not authed(request):
                return _error(401, "Not signed in: open the link fieldreid review printed (it carries the token).")
            body = None
            if write:
                sent = request.headers.get("x-csrf-token", "")
                if not hmac.compare_digest(sent.encode(), state.csrf.encode()):
                    return _error(403, "Missing or wrong CSRF token; reload the page.")
                origin = request.headers.get("origin")
                if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
                    return _error(403, "Cross-origin request refused.")
                if not request.headers.get("content-type", "").startswith("application/json"):
                    return _error(415, "Send JSON.")
                length = request.headers.get("content-length")
                if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                    return _error(413, "Request body too large.")
                raw = b""
                async for part in request.stream():
                    raw += part
                    if len(raw) > MAX_BODY:
                        return _error(413, "Request body too large.")
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    return _error(400, "The body is not valid JSON.")
                if not isinstance(body, dict):
                    return _error(400, "The body must be a JSON object.")

            def run():
                with state.lock:
                    return fn(request, body) if write else fn(request)

            try:
                return await run_in_threadpool(run)
            except NotFound as exc:
                return _error(404, str(exc))
            except actions.ReviewError as exc:
                return _error(409, str(exc))
            except FieldreidError as exc:
                return _error(400, str(exc))
        return endpoint

    def json_ok(data) -> JSONResponse:
        return JSONResponse(data, headers=_headers())

    def who_of(body: dict) -> str:
        name = actions.clean_text(body.get("who"), "reviewer name", limit=64)
        return name or state.who

    # ------------------------------------------------------------------ routes
    async def index(request: Request):
        if not host_ok(request):
            return _error(421, "This review server answers only to its loopback address.")
        token = request.query_params.get("token")
        if token is not None:
            if not hmac.compare_digest(token.encode(), state.token.encode()):
                return HTMLResponse("<!doctype html><p>Wrong token.</p>", status_code=403, headers=_headers())
            path = request.scope.get("root_path", "") + "/"
            resp = RedirectResponse(path, status_code=303, headers=_headers())
            resp.set_cookie(state.cookie, state.session, httponly=True, samesite="strict", path=path,
                            secure=request.url.scheme == "https")
            return resp
        if not authed(request):
            return HTMLResponse("<!doctype html><title>fieldreid review</title><p>Not signed in: open the link that "
                                "<code>fieldreid review</code> printed (it carries the token).</p>", status_code=401,
                                headers=_headers())
        with state.lock:
            page = _page(state)
        return HTMLResponse(page, headers=_headers())

    async def static(request: Request):
        name = request.path_params["name"]
        if name not in STATIC:
            return _error(404, "No such file.")
        if not authed(request):
            return _error(401, "Not signed in.")
        return Response(_static(name), media_type=STATIC[name], headers=_headers({"Cache-Control": "private, max-age=60"}))

    def api_info(request: Request):
        return json_ok({"title": state.source.title, "out": str(state.out), "gallery": str(state.gallery.path),
                        "who": state.who, "counts": state.source.counts(), "options": state.source.options(),
                        "gallery_version": state.gallery.version})

    def api_queue(request: Request):
        filters = Filters.parse(request.query_params)
        tracks = state.source.tracks()
        return json_ok({"items": state.source.queue(filters, tracks), "counts": state.source.counts(tracks)})

    def api_item(request: Request):
        return json_ok(state.source.item(request.path_params["key"]))

    def api_decide(request: Request, body: dict):
        key = request.path_params["key"]
        track = state.source.track_ref(key)
        state.gallery.who = who_of(body)
        try:
            review = actions.decide(state.gallery, track, str(body.get("verdict", "")), identity=body.get("identity"),
                                    name=body.get("name"), new_id=body.get("new_id"), note=body.get("note"),
                                    whole_identity=bool(body.get("whole_identity")), out=str(state.out.resolve()))
        finally:
            state.gallery.who = state.who
        return json_ok({"review": review.to_dict(), "item": state.source.item(key),
                        "counts": state.source.counts()})

    def api_undo(request: Request, body: dict):
        rid = body.get("review")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int)):
            return _error(400, "review must be a decision number.")
        who = who_of(body)
        state.gallery.who = who
        try:
            review = actions.undo(state.gallery, rid, who=None if rid is not None else who)
        finally:
            state.gallery.who = state.who
        return json_ok({"review": review.to_dict(), "counts": state.source.counts()})

    def api_log(request: Request):
        try:
            limit = max(1, min(int(request.query_params.get("limit", "50")), 500))
        except ValueError:
            limit = 50
        return json_ok({"reviews": [r.to_dict() for r in actions.history(state.gallery, limit)]})

    def image(kind: str):
        def fn(request: Request):
            p = request.path_params
            if kind == "thumb":
                data = state.pictures.thumb(p["sha"], p["idx"])
            elif kind == "frame":
                try:
                    side = int(request.query_params.get("max", "1600"))
                except ValueError:
                    side = 1600
                data = state.pictures.frame(p["sha"], side)
            elif kind == "crop":
                data = state.pictures.crop(p["sha"], p["idx"])
            elif kind == "embedding":
                data = state.pictures.embedding(p["id"])
            elif kind == "sighting":
                data = state.pictures.sighting(p["id"])
            else:
                if p["kind"] not in ("embedding", "sighting"):
                    raise NotFound("No such picture.")
                data = state.pictures.matches(p["sha"], p["idx"], p["kind"], p["id"])
            if not data:
                raise NotFound("This picture could not be encoded.")
            return Response(data, media_type="image/jpeg", headers=_headers({"Cache-Control": "private, max-age=600"}))
        return fn

    async def favicon(request: Request):
        return Response(status_code=204, headers=_headers())

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/api/info", guard(api_info), methods=["GET"]),
        Route("/api/queue", guard(api_queue), methods=["GET"]),
        Route("/api/item/{key}", guard(api_item), methods=["GET"]),
        Route("/api/item/{key}/decide", guard(api_decide, write=True), methods=["POST"]),
        Route("/api/undo", guard(api_undo, write=True), methods=["POST"]),
        Route("/api/log", guard(api_log), methods=["GET"]),
        Route("/img/thumb/{sha}/{idx:int}", guard(image("thumb")), methods=["GET"]),
        Route("/img/frame/{sha}", guard(image("frame")), methods=["GET"]),
        Route("/img/crop/{sha}/{idx:int}", guard(image("crop")), methods=["GET"]),
        Route("/img/embedding/{id:int}", guard(image("embedding")), methods=["GET"]),
        Route("/img/sighting/{id:int}", guard(image("sighting")), methods=["GET"]),
        Route("/img/matches/{sha}/{idx:int}/{kind}/{id:int}", guard(image("matches")), methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.review = state
    return app


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8765, *, open_browser: bool = True,
          announce=print, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn until Ctrl-C. The socket is bound first, so ``port=0`` picks a free port
    and the link printed is the real one."""
    import socket

    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover
        raise missing_extra("uvicorn", "review", "the review web app") from exc
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise FieldreidError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
                             "(0 picks a free one).") from exc
    sock.listen(64)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{shown}:{actual}/?token={app.state.review.token}"
    announce(url)
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    config = uvicorn.Config(app, log_level=log_level, access_log=False, server_header=False, proxy_headers=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        app.state.review.close()
