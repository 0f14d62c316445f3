"""The lab's HTTP API (FastAPI). Devices only: administration happens on the lab machine's CLI.

Endpoints (all need ``Authorization: Bearer <device token>``):

* ``GET  /v1/me`` — the device, its projects, their models and gallery versions.
* ``GET  /v1/projects/{project}/galleries/{species}/bundle?since=V`` — a signed delta since V, or a
  full snapshot (``since=0``, too far behind, or most rows changed). Body: a signed msgpack envelope.
* ``POST /v1/projects/{project}/sightings`` — one push chunk (msgpack), header ``Idempotency-Key``.
* ``GET  /v1/public-key`` — the lab's public key, for an operator to compare with what a device pins.
  Devices never take their trust from this endpoint.

Answers: 401 bad / revoked token, 404 a project the device is not in (existence is not revealed),
413 body over the limit, 422 a chunk with an invalid field (refused whole, with the reason), 429
rate-limited (``Retry-After``), 409 version conflict or an idempotency key reused for other sightings.
TLS is the reverse proxy's job (see README): run this on 127.0.0.1 behind nginx / Caddy.

Client addresses (the failed-login limit is per address) are the TCP peer's. ``X-Forwarded-For`` is
believed only from a configured trusted proxy (``--trusted-proxy`` / ``$FIELDREID_TRUSTED_PROXIES``), and
then only as far as the chain passes through trusted proxies: anyone else could send a new address with
every guess.
"""

from __future__ import annotations

import ipaddress
import os

from fieldreid.errors import missing_extra
from fieldreid.server.auth import PROJECT_ID_RE, RateLimiter, hash_token
from fieldreid.server.db import LabDB, LabError, NotFound
from fieldreid.server.fields import SPECIES_RE
from fieldreid.server.ingest import BadChunk, ingest_chunk
from fieldreid.server.signing import unpackb

try:
    from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
except ImportError as exc:  # pragma: no cover
    raise missing_extra("fastapi", "server", "the lab server") from exc

MAX_PUSH_BYTES = 16 * 1024 * 1024
MAX_OTHER_BYTES = 64 * 1024
BUNDLE_TYPE = "application/vnd.fieldreid.bundle+msgpack"
TRUSTED_PROXIES_ENV = "FIELDREID_TRUSTED_PROXIES"


def parse_networks(items) -> tuple:
    """IP addresses or networks (``127.0.0.1``, ``10.0.0.0/8``), given as a list or one comma/space list."""
    if isinstance(items, str):
        items = [items]
    out = []
    for item in items or []:
        for part in str(item).replace(",", " ").split():
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError as exc:
                raise LabError(f"Trusted proxy {part!r} is not an IP address or network ({exc}).") from exc
    return tuple(out)


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def client_address(peer: str, forwarded_for: str | None, trusted: tuple) -> str:
    """The address a request comes from: the TCP peer, unless the peer is a trusted proxy; then the
    ``X-Forwarded-For`` chain is walked from the right (the proxy's own append) past trusted proxies, and
    the first address not in them is the client. Unparseable entries stop the walk at the last trusted hop."""
    def is_trusted(text: str) -> bool:
        ip = _ip(text)
        return ip is not None and any(ip in net for net in trusted)

    if not trusted or not forwarded_for or not is_trusted(peer):
        return peer
    client = peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if _ip(hop) is None:
            return client
        client = hop
        if not is_trusted(hop):
            return hop
    return client


class Limits:
    def __init__(self, rate: float = 50.0, burst: float = 200.0, auth_failures_per_min: float = 30.0,
                 max_push_bytes: int = MAX_PUSH_BYTES, trusted_proxies=None) -> None:
        self.requests = RateLimiter(rate, burst)
        self.auth_failures = RateLimiter(auth_failures_per_min / 60.0, auth_failures_per_min)
        self.max_push_bytes = max_push_bytes
        if trusted_proxies is None:
            trusted_proxies = os.environ.get(TRUSTED_PROXIES_ENV, "")
        #: proxies whose X-Forwarded-For is believed (none by default: the TCP peer is the client)
        self.trusted_proxies = parse_networks(trusted_proxies)


def create_app(lab: LabDB, limits: Limits | None = None, review=None) -> FastAPI:
    """The lab API; ``review`` (an app of :func:`fieldreid.review.app.create_app`) is mounted at ``/review``."""
    limits = limits or Limits()
    app = FastAPI(title="fieldreid lab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lab = lab

    def _too_many(wait: float, what: str) -> HTTPException:
        return HTTPException(429, f"Too many {what}; retry in {wait:.0f} s.",
                             headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    @app.middleware("http")
    async def _size_limit(request: Request, call_next):
        limit = limits.max_push_bytes if request.method == "POST" else MAX_OTHER_BYTES
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse({"detail": f"Request body over {limit} bytes."}, status_code=413)
        return await call_next(request)

    def device(request: Request, authorization: str | None = Header(default=None)) -> str:
        peer = request.client.host if request.client else "?"
        client = client_address(peer, request.headers.get("x-forwarded-for"), limits.trusted_proxies)
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        found = lab.device_for_token_hash(hash_token(token)) if 20 <= len(token) <= 200 else None
        if found is None or found[1]:
            wait = limits.auth_failures.allow(client)
            if wait:
                raise _too_many(wait, "failed logins")
            what = "revoked" if found else "not valid"
            raise HTTPException(401, f"The device token is {what}.", headers={"WWW-Authenticate": "Bearer"})
        wait = limits.requests.allow(found[0])
        if wait:
            raise _too_many(wait, "requests")
        return found[0]

    def member(con, device_id: str, project: str) -> None:
        if not PROJECT_ID_RE.match(project) or project not in lab.device_projects(con, device_id):
            raise HTTPException(404, "No such project for this device.")

    @app.exception_handler(LabError)
    async def _lab_error(_request: Request, exc: LabError):
        code = 404 if isinstance(exc, NotFound) else 422 if isinstance(exc, BadChunk) else 409
        return JSONResponse({"detail": str(exc)}, status_code=code)

    @app.get("/v1/me")
    def me(device_id: str = Depends(device)) -> dict:
        with lab.read() as con:
            projects = {}
            for p in lab.device_projects(con, device_id):
                proj = lab.project(con, p)
                # a gallery whose name is outside the pattern cannot be served: listing it would send every
                # device after a bundle it can never get (one made before names were checked, say)
                projects[p] = {"model_id": proj.model_id, "dim": proj.dim,
                               "galleries": {g.species: g.version for g in lab.galleries(con, p)
                                             if SPECIES_RE.match(g.species)}}
        return {"device": device_id, "projects": projects, "key_id": lab.key.key_id}

    @app.get("/v1/public-key")
    def public_key(device_id: str = Depends(device)) -> dict:
        return {"alg": "ed25519", "key": lab.key.public_b64, "key_id": lab.key.key_id}

    @app.get("/v1/projects/{project}/galleries/{species}/bundle")
    def bundle(project: str, species: str, since: int = Query(0, ge=0, le=2**62),
               device_id: str = Depends(device)) -> Response:
        if not SPECIES_RE.match(species):
            raise HTTPException(404, "No such gallery.")
        with lab.read() as con:
            member(con, device_id, project)
        data, info = lab.build_bundle(project, species, since)
        return Response(data, media_type=BUNDLE_TYPE, headers={
            "X-Fieldreid-Kind": info["kind"], "X-Fieldreid-Version": str(info["version"])})

    @app.post("/v1/projects/{project}/sightings")
    async def push(project: str, request: Request, idempotency_key: str = Header(...),
                   device_id: str = Depends(device)) -> dict:
        def check_member():
            with lab.read() as con:
                member(con, device_id, project)

        await run_in_threadpool(check_member)
        body = bytearray()
        async for part in request.stream():  # chunked uploads have no Content-Length: count as we go
            body += part
            if len(body) > limits.max_push_bytes:
                raise HTTPException(413, f"Request body over {limits.max_push_bytes} bytes.")
        try:
            chunk = unpackb(bytes(body))
        except Exception:
            raise HTTPException(422, "The chunk is not valid msgpack.") from None
        return await run_in_threadpool(ingest_chunk, lab, device_id, project, idempotency_key, chunk)

    if review is not None:  # people review in the browser here; devices never reach it (its own token and cookie)
        app.mount("/review", review)
    return app


def serve(db: str | None, data_dir: str | None, host: str = "127.0.0.1", port: int = 8750,
          limits: Limits | None = None, log_level: str = "info", review=None) -> None:
    """Run the API with uvicorn in this process (one worker: SQLite and the rate limiter live here)."""
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover
        raise missing_extra("uvicorn", "server", "the lab server") from exc
    lab = LabDB(db, data_dir)
    # uvicorn's own proxy-header handling stays off: the app decides (client_address) from the TCP peer
    uvicorn.run(create_app(lab, limits, review), host=host, port=port, log_level=log_level, access_log=False,
                proxy_headers=False, server_header=False)
