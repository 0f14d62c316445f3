"""The device side of sync: pull signed galleries from the lab, push queued sightings, over flaky links.

The token comes from ``$FIELDREID_TOKEN`` or the config file (never a command-line argument, which other
users can read in ``ps``). The lab's ed25519 public key is pinned in the config file (or ``--lab-key``);
a bundle that does not verify under it is rejected before it is even decoded.

Retries: connection errors, timeouts, 5xx and 429 are retried with exponential back-off (``Retry-After``
honoured); 401/404/409/413/422 are not (they will not get better by waiting). A push that gives up leaves
every unacknowledged sighting in the queue for the next run; a re-sent chunk carries the same
idempotency key, so the lab stores it once. A chunk the lab refuses as a whole (409/413/422) is recorded
with the lab's reason, reported, and not sent again; the other chunks go on. One species gallery that
cannot be pulled (a name outside the lab's pattern, gone, refused) is reported and skipped: the other
species are pulled and the push still runs.

Config file: the device configuration (:mod:`fieldreid.config`; TOML, default ``$FIELDREID_CONFIG`` or
``~/.config/fieldreid/config.toml``, mode 0600; ``fieldreid init`` writes it), sync's keys::

    server = "https://lab.example.org"
    project = "kenya-2025"
    lab_public_key = "base64 from `fieldreid server public-key`"
    token = "frd_..."            # or set FIELDREID_TOKEN
"""

from __future__ import annotations

import os
import stat
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fieldreid.errors import FieldreidError, missing_extra
from fieldreid.gallery.store import Gallery
from fieldreid.server.fields import SPECIES_RE, SPECIES_RULE
from fieldreid.server.signing import SignatureError, packb, parse_public_key, verify_bundle
from fieldreid.sync.apply import BundleError, apply_bundle, pulled_version
from fieldreid.sync.queue import CropFn, EmbedFn, Outbox, crop_from_file, get_state

TOKEN_ENV = "FIELDREID_TOKEN"
CONFIG_ENV = "FIELDREID_SYNC_CONFIG"


class SyncError(FieldreidError):
    """Sync could not finish; what was done stays done and the rest is retried on the next run."""


class AuthError(SyncError):
    """The lab refused this device's token (wrong, revoked) or the device is not in the project."""


class NotFoundError(AuthError):
    """HTTP 404: a project the device is not in, or a gallery the lab does not serve."""


class RefusedError(SyncError):
    """The lab refused a request for good (HTTP 409, 413, 422, ...): resending it will not help."""

    def __init__(self, message: str, status: int, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


def default_config_path() -> Path:
    """The device configuration file (:mod:`fieldreid.config`): sync reads the same file as watch."""
    from fieldreid.config import default_config_path as device_config_path

    return device_config_path()


@dataclass
class SyncConfig:
    server: str
    token: str
    lab_key: bytes
    project: str | None = None
    timeout: float = 60.0
    retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 30.0
    chunk_sightings: int = 64
    chunk_bytes: int = 4 * 1024 * 1024
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path | None = None, *, server: str | None = None, lab_key: str | Path | None = None,
             project: str | None = None, **kw) -> SyncConfig:
        """Merge the config file (if any), ``$FIELDREID_TOKEN`` and explicit options (explicit wins)."""
        path = Path(path) if path else default_config_path()
        data: dict = {}
        warnings = []
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SyncError(f"Cannot read sync config {path}: {exc}") from exc
            if "token" in data and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                warnings.append(f"{path} holds the device token but other users can read it: chmod 600 {path}")
        token = os.environ.get(TOKEN_ENV) or data.get("token")
        if not token:
            raise AuthError(f"No device token: set {TOKEN_ENV} or put token = \"...\" in {path} (mode 600). "
                            "The lab prints it once with `fieldreid server add-device`.")
        server = server or data.get("server")
        if not server:
            raise SyncError(f"No lab server: pass --server URL or set server = \"...\" in {path}.")
        if lab_key:
            key_text = Path(lab_key).read_text(encoding="utf-8") if Path(str(lab_key)).is_file() else str(lab_key)
        elif data.get("lab_public_key_file"):
            key_file = Path(data["lab_public_key_file"]).expanduser()
            key_text = (key_file if key_file.is_absolute() else path.parent / key_file).read_text(encoding="utf-8")
        elif data.get("lab_public_key"):
            key_text = data["lab_public_key"]
        else:
            raise SyncError(f"No lab public key: put lab_public_key = \"...\" (from `fieldreid server public-key` "
                            f"on the lab machine) in {path}, or pass --lab-key FILE. Pulls are never trusted "
                            "without it.")
        for name in ("timeout", "retries", "chunk_sightings", "chunk_bytes"):
            if name in data and name not in kw:
                kw[name] = data[name]
        return cls(server=server.rstrip("/"), token=token, lab_key=parse_public_key(key_text),
                   project=project or data.get("project"), warnings=warnings, **kw)


@dataclass
class PushReport:
    queued: int = 0
    chunks: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: list[dict] = field(default_factory=list)
    replayed: int = 0
    bytes_sent: int = 0
    pending: int = 0
    #: sightings the lab now has that were sent without a JPEG crop / without an embedding
    no_crop: int = 0
    no_vector: int = 0
    #: chunks refused by the lab in this run
    refused_now: int = 0
    #: every chunk on record as refused (``{key, sightings, reason}``): kept, not resent
    refused: list[dict] = field(default_factory=list)


@dataclass
class PullReport:
    species: str
    kind: str
    from_version: int
    to_version: int
    bytes: int
    details: dict
    #: why this species was not pulled (the others were); None when it was
    error: str | None = None


class SyncClient:
    """One device talking to the lab.

    >>> client = SyncClient(SyncConfig.load(server="https://lab.example.org"))   # doctest: +SKIP
    >>> with Gallery("field.db") as g:                                          # doctest: +SKIP
    ...     client.pull(g); client.push(g)
    """

    def __init__(self, config: SyncConfig, transport=None) -> None:
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover
            raise missing_extra("httpx", "sync", "talking to the lab server") from exc
        self.config = config
        self._httpx = httpx
        self.http = httpx.Client(base_url=config.server, timeout=config.timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {config.token}",
                                          "User-Agent": "fieldreid-sync/1"})
        self.bytes_received = 0
        self.bytes_sent = 0
        self._me: dict | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- transport
    def _request(self, method: str, path: str, **kw):
        httpx = self._httpx
        delay = self.config.backoff
        last = ""
        for attempt in range(self.config.retries + 1):
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                resp = None
            if resp is not None:
                self.bytes_received += len(resp.content)
                if resp.status_code < 400:
                    return resp
                detail = _detail(resp)
                if resp.status_code == 401:
                    raise AuthError(f"The lab refused this device's token ({detail}). Ask the lab for a new one.")
                if resp.status_code == 404:
                    raise NotFoundError(f"{path}: not found for this device ({detail}); check --project.")
                if resp.status_code not in (429, 500, 502, 503, 504):
                    raise RefusedError(f"The lab answered {resp.status_code} to {method} {path}: {detail}",
                                       resp.status_code, detail)
                last = f"HTTP {resp.status_code}: {detail}"
                ra = resp.headers.get("Retry-After")
                if ra and ra.isdigit():
                    delay = max(delay, float(ra))
            if attempt < self.config.retries:
                time.sleep(min(delay, self.config.max_backoff))
                delay = min(delay * 2, self.config.max_backoff)
        raise SyncError(f"The lab server is unreachable or failing ({last}); nothing is lost, run sync again "
                        "when the link is back.")

    def me(self) -> dict:
        if self._me is None:
            self._me = self._request("GET", "/v1/me").json()
        return self._me

    def project_for(self, gallery: Gallery) -> tuple[str, dict]:
        me = self.me()
        bound = get_state(gallery, "project")
        project = self.config.project or bound
        if project is None:
            if len(me["projects"]) != 1:
                raise SyncError(f"This device is in projects {sorted(me['projects'])}: choose one with --project.")
            project = next(iter(me["projects"]))
        if bound is not None and bound != project:
            raise SyncError(f"{gallery.path} is synced with project '{bound}', not '{project}'. Use one gallery "
                            "file per project.")
        if project not in me["projects"]:
            raise AuthError(f"This device is not registered for project '{project}'.")
        return project, me["projects"][project]

    # ---------------------------------------------------------------- pull
    def fetch_bundle(self, project: str, species: str, since: int) -> bytes:
        return self._request("GET", f"/v1/projects/{project}/galleries/{species}/bundle",
                             params={"since": since}).content

    def pull(self, gallery: Gallery, species: list[str] | None = None, full: bool = False) -> list[PullReport]:
        """Bring every (or the named) species gallery of the project up to the lab's latest version."""
        self._me = None  # the lab's versions now, not as of an earlier call
        project, info = self.project_for(gallery)
        device = self.me()["device"]
        reports = []
        for sp, lab_version in sorted(info["galleries"].items()):
            if species and sp not in species:
                continue
            current = 0 if full else pulled_version(gallery, project, sp)
            if not isinstance(sp, str) or not SPECIES_RE.match(sp):
                reports.append(PullReport(str(sp), "failed", current, current, 0, {}, error=(
                    f"the lab lists a gallery named {str(sp)[:80]!r}, which is not a valid species name "
                    f"({SPECIES_RULE}); skipped - ask the lab to rename or delete it")))
                continue
            if current == lab_version and not full:
                reports.append(PullReport(sp, "up-to-date", current, current, 0, {}))
                continue
            try:
                data, payload, details = self._pull_one(gallery, project, sp, current, device)
            except (NotFoundError, RefusedError, BundleError) as exc:  # this gallery only: the others go on
                reports.append(PullReport(sp, "failed", current, current, 0, {}, error=str(exc)))
                continue
            reports.append(PullReport(sp, payload["kind"], current, payload["version"], len(data), details))
        return reports

    def _pull_one(self, gallery: Gallery, project: str, sp: str, current: int, device: str):
        data = self.fetch_bundle(project, sp, current)
        payload = verify_bundle(data, self.config.lab_key)  # raises SignatureError: nothing applied
        try:
            details = apply_bundle(gallery, payload, project, sp, device)
        except BundleError:
            if current == 0:
                raise
            # a delta that no longer fits (e.g. the local gallery was edited): fall back to a snapshot
            data = self.fetch_bundle(project, sp, 0)
            payload = verify_bundle(data, self.config.lab_key)
            details = apply_bundle(gallery, payload, project, sp, device)
        return data, payload, details

    # ---------------------------------------------------------------- push
    def push(self, gallery: Gallery, collect: bool = True, crop_fn: CropFn | None = crop_from_file,
             embed_fn: EmbedFn | None = None,
             on_response: Callable[[int, str, dict], None] | None = None) -> PushReport:
        """Send every queued sighting, chunk by chunk; ``on_response(i, key, answer)`` runs after the lab
        answered a chunk and before the device records it (tests use it to cut the link there)."""
        project, _ = self.project_for(gallery)
        device = self.me()["device"]
        outbox = Outbox(gallery)
        report = PushReport()
        if collect:
            report.queued = outbox.collect(crop_fn=crop_fn, embed_fn=embed_fn)
        for i, chunk in enumerate(outbox.chunks(self.config.chunk_sightings, self.config.chunk_bytes)):
            body, _ = outbox.payload(chunk, device)
            introduced = body["identities"]
            wire = {"sightings": body["sightings"],
                    "identities": [{k: v for k, v in d.items() if k != "_ids"} for d in introduced]}
            data = packb(wire)
            try:
                resp = self._request("POST", f"/v1/projects/{project}/sightings", content=data,
                                     headers={"Idempotency-Key": chunk.key, "Content-Type": "application/msgpack"})
            except RefusedError as exc:
                if exc.status not in (409, 413, 422):
                    raise
                # refused as a whole (invalid field, reused key, too large): resending the same chunk would
                # be refused again, and must not hold back the chunks after it
                outbox.reject(chunk, f"HTTP {exc.status}: {exc.detail}")
                report.refused_now += 1
                continue
            self.bytes_sent += len(data)
            report.bytes_sent += len(data)
            answer = resp.json()
            if on_response is not None:
                on_response(i, chunk.key, answer)
            outbox.ack(chunk, introduced)
            report.chunks += 1
            report.no_crop += sum(s.get("crop") is None for s in wire["sightings"])
            report.no_vector += sum(s.get("vector") is None for s in wire["sightings"])
            if answer.get("replayed"):  # stored by an earlier attempt whose answer was lost
                report.replayed += 1
                report.duplicates += len(chunk.sighting_ids)
            else:
                report.accepted += int(answer.get("accepted", 0))
                report.duplicates += int(answer.get("duplicates", 0))
                report.rejected.extend(answer.get("rejected", []))
        report.pending = outbox.pending()
        report.refused = outbox.rejected_chunks()
        return report

    def sync(self, gallery: Gallery, pull: bool = True, push: bool = True, **kw) -> tuple[list[PullReport],
                                                                                          PushReport | None]:
        pulled = self.pull(gallery) if pull else []
        pushed = self.push(gallery, **kw) if push else None
        return pulled, pushed


def _detail(resp) -> str:
    try:
        return str(resp.json().get("detail", ""))[:300]
    except Exception:
        return resp.text[:300]


__all__ = ["AuthError", "NotFoundError", "PullReport", "PushReport", "RefusedError", "SignatureError", "SyncClient",
           "SyncConfig", "SyncError"]
