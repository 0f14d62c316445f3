"""Camtrap DP 1.0.2 (TDWG) package from a watch output folder: deployments, media, observations.

The package validates against the standard's own profile and table schemas (the tests check it offline with
the official files in ``../shared/standards/camtrap-dp-1.0.2``) and reads in camtrapR, camtraptor and camtrapdp:

* **deployments** — one per camera folder. ``--deployments CSV`` (``deploymentID`` = camera folder, and any
  Camtrap DP deployment column: ``locationID``, ``latitude``, ``longitude``, ``deploymentStart``/``End``,
  ``setupBy``, …, plus ``utcOffset``: the camera clock's offset) gives the facts. Without it ``locationID`` =
  the deployment id, start/end = the first/last image, coordinates come from EXIF GPS when the camera wrote
  them, and every guessed field is listed in the warnings and in ``deploymentComments``.
* **media** — one row per processed image (a duplicate is the same picture; a failed file has no row).
  ``mediaID`` = the first 20 hex digits of the image's sha256. ``filePath`` follows the standard's pattern
  (no ``../``, no leading ``/``): relative to the package when the images lie inside its folder, else
  ``--media-base`` + the path under the watched folder (a URL, or a folder relative to the package), else
  an absolute ``file:`` URI (valid wherever the package is written, on this machine). ``exifData`` is a
  JSON object.
* **observations** — media-level rows (one per detection, one ``blank`` per empty image) and event-level
  rows (one per event × individual, with ``count``; one per event for unidentified animals, humans and
  vehicles with the largest number seen in one image; ``blank`` for an empty event). Species
  (``scientificName``) come from ``--species``, the folder level ``--species-level N`` (``Station/SPECIES/…``
  is level 2), the identity's species in the gallery, the camera's ``.fieldreid-species`` file, or the
  species the watch searched, else ``Animalia`` (kingdom); ``--taxa CSV`` (``species,scientificName,vernacularName[,taxonRank,taxonID]``)
  names them, and the package's ``taxonomic`` list carries scientific and vernacular names.
* identities are read from the **gallery at report time** (:mod:`fieldreid.report.identities`): merges,
  renames, confirmations and review verdicts show; a person's confirmation or review is
  ``classificationMethod = human`` with ``classifiedBy`` = who, a match stays ``machine`` with the embedder's
  model id.
* ``classificationProbability`` says how sure the classification in *that row* is. A row with an
  ``individualID`` from fieldreid (*known*, or *new*: a provisional animal) carries the decision's
  calibrated probability (:attr:`fieldreid.gallery.openset.Decision.probability`: P(that animal), or P(a new
  animal)), one per track; empty where the gallery held no calibration (never a cosine) and for a person's
  classification. An *uncertain* row names no individual, so its probability of the best candidate goes in
  ``observationComments``. A detection with no identity decision keeps the detector's confidence: that row
  classifies the observation type (animal / human / vehicle), which is what the detector decided. An
  event-level individual row takes the highest probability of its tracks.
* timestamps: EXIF ``OffsetTimeOriginal``, else the deployment's ``utcOffset``, else ``--utc-offset``, else
  +00:00 (a guess, warned).
* package metadata: ``--project FILE`` (JSON or TOML: ``title``, ``description``, ``contributors``, ``licenses``,
  ``project`` {``samplingDesign``, …}, ``bibliographicCitation``, …) and the options ``--contributor``,
  ``--data-license``, ``--media-license`` (options win). Both licence scopes or none (warned).
* file names are the watch's text form (:func:`fieldreid.storage.fsutil.path_text`): a name that is not UTF-8
  has ``\\xNN`` for each undecodable byte (and ``\\\\`` for a backslash) in ``filePath`` and ``fileName``.
"""

from __future__ import annotations

import csv
import getpass
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from fieldreid.errors import FieldreidError
from fieldreid.report.identities import IdentityResolver, review_view
from fieldreid.report.tables import atomic_text, decision_probability
from fieldreid.storage.fsutil import path_text, text_path
from fieldreid.watch.state import StateDB

VERSION = "1.0.2"
BASE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}"
PROFILE = f"{BASE}/camtrap-dp-profile.json"
DATETIME = "%Y-%m-%dT%H:%M:%S%z"
MEDIATYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".tif": "image/tiff",
              ".tiff": "image/tiff", ".bmp": "image/bmp", ".webp": "image/webp"}
#: column order of the three tables (Camtrap DP 1.0.2; the official table schemas define types and constraints)
COLUMNS: dict[str, list[str]] = {
    "deployments": ["deploymentID", "locationID", "locationName", "latitude", "longitude", "coordinateUncertainty",
                    "deploymentStart", "deploymentEnd", "setupBy", "cameraID", "cameraModel", "cameraDelay",
                    "cameraHeight", "cameraDepth", "cameraTilt", "cameraHeading", "detectionDistance",
                    "timestampIssues", "baitUse", "featureType", "habitat", "deploymentGroups", "deploymentTags",
                    "deploymentComments"],
    "media": ["mediaID", "deploymentID", "captureMethod", "timestamp", "filePath", "filePublic", "fileName",
              "fileMediatype", "exifData", "favorite", "mediaComments"],
    "observations": ["observationID", "deploymentID", "mediaID", "eventID", "eventStart", "eventEnd",
                     "observationLevel", "observationType", "cameraSetupType", "scientificName", "count", "lifeStage",
                     "sex", "behavior", "individualID", "individualPositionRadius", "individualPositionAngle",
                     "individualSpeed", "bboxX", "bboxY", "bboxWidth", "bboxHeight", "classificationMethod",
                     "classifiedBy", "classificationTimestamp", "classificationProbability", "observationTags",
                     "observationComments"],
}
OBSERVATION_TYPES = {1: "animal", 2: "human", 3: "vehicle"}
CONTRIBUTOR_ROLES = ("contact", "principalInvestigator", "rightsHolder", "publisher", "contributor")
SAMPLING_DESIGNS = ("simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted",
                    "opportunistic")
#: filePath pattern of the official media table schema: no leading '.', '/' or '~' and no '..'
FILE_PATH_RE = re.compile(r"^(?=^[^./~])(^((?!\.{2}).)*$).*$")
UNKNOWN_SPECIES = "animal"
#: an animal of no known species is still of the kingdom Animalia: camtrapR stops on a package whose taxonomic
#: list has no vernacular names, and camtrapdp's taxa come from scientificName
DEFAULT_TAXA = {UNKNOWN_SPECIES: {"scientificName": "Animalia", "taxonRank": "kingdom",
                                  "vernacularNames": {"eng": "animal"}}}


def columns(table: str) -> list[str]:
    return list(COLUMNS[table])


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v: float, digits: int = 6) -> str:
    return f"{min(1.0, max(0.0, float(v))):.{digits}f}".rstrip("0").rstrip(".") or "0"


def _bbox(x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> tuple[str, str, str, str]:
    x1, x2 = max(0.0, x1), min(float(w), x2)
    y1, y2 = max(0.0, y1), min(float(h), y2)
    bw, bh = max((x2 - x1) / w, 1e-6), max((y2 - y1) / h, 1e-6)
    return _num(x1 / w), _num(y1 / h), _num(bw), _num(bh)


def _offset(value: str, what: str) -> str:
    from fieldreid.frames.exif import parse_offset

    off = parse_offset(value)
    if off is None:
        raise FieldreidError(f"{what} must look like +02:00 or -0500, got {value!r}.")
    return off


def _stamp_text(value: str, offset: str, what: str) -> str:
    """A deployment start/end from the CSV: ``YYYY-MM-DDTHH:MM:SS`` with an offset (or ``Z``); without one the
    deployment's offset is added."""
    v = value.strip().replace(" ", "T")
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    if not re.search(r"[+-]\d\d:?\d\d$", v[10:]):
        v += offset
    try:
        datetime.strptime(v, DATETIME)
    except ValueError:
        raise FieldreidError(f"{what}: {value!r} is not a date-time like 2024-05-01T08:00:00+02:00.") from None
    return v


# ---------------------------------------------------------------------------------------------- inputs
def _read_csv(path: Path, what: str) -> list[dict]:
    try:
        with Path(path).open(encoding="utf-8-sig", newline="") as fh:
            return [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError) as exc:
        raise FieldreidError(f"Cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}.") from exc


def read_deployments(path: Path | None) -> dict[str, dict]:
    """``--deployments`` CSV rows by deploymentID, checked: numbers are numbers, offsets are offsets."""
    if path is None:
        return {}
    rows = _read_csv(path, "deployments file")
    if rows and "deploymentID" not in rows[0]:
        raise FieldreidError(f"{path} needs a deploymentID column (the camera folder names).")
    out: dict[str, dict] = {}
    for n, r in enumerate(rows, start=2):
        dep = r.get("deploymentID", "")
        if not dep:
            raise FieldreidError(f"{path} line {n}: empty deploymentID.")
        if dep in out:
            raise FieldreidError(f"{path} line {n}: deploymentID {dep!r} appears twice.")
        for col, lo, hi in (("latitude", -90, 90), ("longitude", -180, 180)):
            if r.get(col):
                try:
                    ok = lo <= float(r[col]) <= hi
                except ValueError:
                    ok = False
                if not ok:
                    raise FieldreidError(f"{path} line {n}: {col} {r[col]!r} is not a number in [{lo}, {hi}].")
        if r.get("utcOffset"):
            r["utcOffset"] = _offset(r["utcOffset"], f"{path} line {n}: utcOffset")
        out[dep] = r
    return out


def read_taxa(path: Path | None) -> dict[str, dict]:
    """``--taxa`` CSV: species label -> taxon (scientificName, vernacularNames, taxonRank, taxonID)."""
    if path is None:
        return {}
    rows = _read_csv(path, "taxa file")
    if rows and not {"species", "scientificName"} <= set(rows[0]):
        raise FieldreidError(f"{path} needs the columns species, scientificName (and vernacularName).")
    out: dict[str, dict] = {}
    for r in rows:
        taxon: dict = {"scientificName": r["scientificName"]}
        names = {"eng": r["vernacularName"]} if r.get("vernacularName") else {}
        names |= {k.split(".", 1)[1]: v for k, v in r.items() if k.startswith("vernacularName.") and v}
        if names:
            taxon["vernacularNames"] = names
        for k in ("taxonRank", "taxonID", "kingdom", "phylum", "class", "order", "family", "genus"):
            if r.get(k):
                taxon[k] = r[k]
        out[r["species"]] = taxon
    return out


def read_project(path: Path | None) -> dict:
    """``--project`` file (JSON or TOML): package metadata."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FieldreidError(f"Cannot read project file {path}: {getattr(exc, 'strerror', None) or exc}.") from exc
    try:
        if Path(path).suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise FieldreidError(f"Project file {path} is not valid {Path(path).suffix.lstrip('.').upper() or 'JSON'}: "
                             f"{exc}.") from exc
    if not isinstance(data, dict):
        raise FieldreidError(f"Project file {path} must hold an object (title, contributors, licenses, project…).")
    return data


def parse_contributor(text: str) -> dict:
    """``Jane Doe <jane@example.org> (principalInvestigator)`` -> a Camtrap DP contributor."""
    m = re.fullmatch(r"\s*([^<(]+?)\s*(?:<([^>]+)>)?\s*(?:\((\w+)\))?\s*", text)
    if not m:
        raise FieldreidError(f"--contributor must look like 'Name <email> (role)', got {text!r}.")
    title, email, role = m.groups()
    if role and role not in CONTRIBUTOR_ROLES:
        raise FieldreidError(f"contributor role must be one of {', '.join(CONTRIBUTOR_ROLES)}, got {role!r}.")
    c: dict = {"title": title}
    if email:
        c["email"] = email
    c["role"] = role or "contributor"
    return c


def _license(value: str, scope: str) -> dict:
    return ({"path": value, "scope": scope} if "://" in value else {"name": value, "scope": scope})


@dataclass
class Options:
    """What ``fieldreid report --camtrap-dp`` is told besides the watch output."""

    deployments_csv: Path | None = None
    utc_offset: str | None = None
    title: str | None = None
    species: str | None = None
    species_level: int | None = None
    taxa_csv: Path | None = None
    project_file: Path | None = None
    contributors: list[str] = field(default_factory=list)
    data_license: str | None = None
    media_license: str | None = None
    media_base: str | None = None
    gallery: Path | None = None


class _Species:
    """The species label of an animal, by the first source that has one (see the module docstring)."""

    def __init__(self, root_fs: str, species: str | None, level: int | None) -> None:
        from fieldreid.watch.runner import camera_species

        self.root_fs, self.species, self.level = root_fs, species, level
        self._camera_species = camera_species
        self._cams: dict[str, str | None] = {}

    def folder(self, path: str) -> str | None:
        """The species folder (``--species-level``) an image was sorted into, if any."""
        parts = PurePosixPath(path).parts
        return parts[self.level - 1] if self.level and len(parts) > self.level else None

    def __call__(self, path: str, camera: str, identity_species: str | None, searched: str | None) -> str | None:
        if self.species:
            return self.species
        if self.folder(path):
            return self.folder(path)
        if identity_species:
            return identity_species
        if camera not in self._cams:
            self._cams[camera] = (self._camera_species(Path(self.root_fs), camera)
                                  if os.path.isdir(self.root_fs) else None)
        if self._cams[camera]:
            return self._cams[camera]
        return searched if searched and searched != UNKNOWN_SPECIES else UNKNOWN_SPECIES


def _media_path(rel: str, root_fs: str, pkg_abs: Path, media_base: str | None) -> tuple[str, bool]:
    """(filePath, is_absolute_uri) for the image ``rel`` (text form, relative to the watched folder)."""
    if media_base:
        tail = quote(rel, safe="/\\") if "://" in media_base else rel
        return media_base.rstrip("/") + "/" + tail, False
    full = os.path.realpath(os.path.join(root_fs, text_path(rel)))
    try:
        inside = Path(full).relative_to(pkg_abs)
    except ValueError:
        return "file://" + quote(os.fsencode(full)), True
    return path_text(inside.as_posix()), False


def _check_media_base(base: str) -> str:
    base = base.strip()
    if not base or not FILE_PATH_RE.match(base) or "\\" in base:
        raise FieldreidError(f"--media-base must be a URL or a folder relative to the package (no leading '/', "
                             f"'.' or '~', no '..'), got {base!r}.")
    return base


class _Event:
    __slots__ = ("cam", "first", "last", "individuals", "counts", "n")

    def __init__(self, cam: str) -> None:
        self.cam = cam
        self.first: tuple[float, str] | None = None
        self.last: tuple[float, str] | None = None
        self.individuals: dict[tuple, dict] = {}
        self.counts: dict[tuple[str, str], int] = {}  # (type, species) -> most seen in one image
        self.n = 0

    def see(self, ts: float, stamp: str) -> None:
        if self.first is None or ts < self.first[0]:
            self.first = (ts, stamp)
        if self.last is None or ts > self.last[0]:
            self.last = (ts, stamp)


def write_package(out: Path, pkg: Path, deployments_csv: Path | None = None, utc_offset: str | None = None,
                  title: str | None = None, options: Options | None = None) -> tuple[Path, list[str]]:
    """Write ``pkg/{datapackage.json, deployments.csv, media.csv, observations.csv}``; returns (path, warnings)."""
    o = options or Options()
    o.deployments_csv = o.deployments_csv or deployments_csv
    o.utc_offset = o.utc_offset or utc_offset
    o.title = o.title or title
    default_offset = _offset(o.utc_offset, "--utc-offset") if o.utc_offset else None
    given = read_deployments(o.deployments_csv)
    taxa = {**DEFAULT_TAXA, **read_taxa(o.taxa_csv)}
    project_meta = read_project(o.project_file)
    media_base = _check_media_base(o.media_base) if o.media_base else None
    if o.species_level is not None and o.species_level < 1:
        raise FieldreidError("--species-level must be 1 (the camera folder) or deeper, e.g. 2 for Station/SPECIES/.")
    contributors = [parse_contributor(c) for c in o.contributors] or project_meta.get("contributors") or []
    licenses = [*(_license(o.data_license, "data") for _ in [0] if o.data_license),
                *(_license(o.media_license, "media") for _ in [0] if o.media_license)] or project_meta.get("licenses")
    if licenses and {lic.get("scope") for lic in licenses} != {"data", "media"}:
        raise FieldreidError("Camtrap DP needs a licence for the data and one for the media: pass both "
                             "--data-license and --media-license (or both scopes in the project file).")
    db = StateDB(Path(out) / "results.db", readonly=True)
    warnings: list[str] = []
    try:
        con = db.con
        root = Path(db.meta("root") or ".")  # text form (path_text) of the watched folder
        root_fs = text_path(str(root))
        embedder = db.meta("embedder") or "embedder"
        detector = db.meta("detector") or "detector"
        gallery = Path(o.gallery) if o.gallery else (Path(db.meta("gallery")) if db.meta("gallery") else None)
        resolver = IdentityResolver(gallery)
        if gallery is not None and not resolver.available:
            why = f"could not be read ({resolver.error})" if resolver.error else "not found"
            warnings.append(f"gallery {gallery} {why}: identities are as watch recorded them, without later "
                            "merges, renames or confirmations (pass --gallery).")
        species_of = _Species(root_fs, o.species, o.species_level)
        pkg = Path(pkg)
        pkg.mkdir(parents=True, exist_ok=True)
        pkg_abs = Path(os.path.realpath(pkg))
        cams = con.execute(
            "SELECT camera, min(captured_ts), max(captured_ts), avg(latitude), avg(longitude), max(model), max(make), "
            "sum(utc_offset IS NULL) FROM images GROUP BY camera ORDER BY camera").fetchall()
        unknown = sorted(set(given) - {c[0] for c in cams})
        if unknown:
            warnings.append(f"--deployments rows for cameras with no images here: {', '.join(unknown)}.")
        dep_offset: dict[str, str] = {}
        guessed: dict[str, list[str]] = {}
        for cam, *_rest, no_offset in cams:
            g = given.get(cam, {})
            dep_offset[cam] = g.get("utcOffset") or default_offset or "+00:00"
            if no_offset and not (g.get("utcOffset") or default_offset):
                guessed.setdefault(cam, []).append(f"UTC offset (+00:00 assumed for {no_offset} image(s) without "
                                                   "EXIF OffsetTimeOriginal)")

        def stamp(captured: str, off: str | None, cam: str) -> str:
            return captured + (off or dep_offset[cam])

        # -- media
        n_media, uri_paths = 0, 0
        starts: dict[str, str] = {}
        ends: dict[str, str] = {}
        with atomic_text(pkg / "media.csv") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS["media"])
            for sha, path, cam, captured, off, make, model, tsrc, lat, lon in con.execute(
                    "SELECT sha256, path, camera, captured, utc_offset, make, model, time_source, latitude, longitude "
                    "FROM images ORDER BY camera, captured_ts, path"):
                exif = {k: v for k, v in (("Make", make), ("Model", model), ("timeSource", tsrc),
                                          ("OffsetTimeOriginal", off), ("GPSLatitude", lat), ("GPSLongitude", lon))
                        if v is not None and v != ""}
                file_path, is_uri = _media_path(path, root_fs, pkg_abs, media_base)
                uri_paths += is_uri
                ts = stamp(captured, off, cam)
                starts.setdefault(cam, ts)
                ends[cam] = ts
                w.writerow([sha[:20], cam, "activityDetection", ts, file_path, "false", PurePosixPath(path).name,
                            MEDIATYPES.get(PurePosixPath(path).suffix.lower(), "image/jpeg"),
                            json.dumps(exif, ensure_ascii=False) if exif else "", "", ""])
                n_media += 1
        if uri_paths:
            warnings.append(f"{uri_paths} media file(s) lie outside the package folder: filePath is an absolute "
                            "file: URI (valid on this machine only); pass --media-base URL_OR_FOLDER to publish them.")
        # -- observations
        from fieldreid.gallery.store import box_key

        frames = {(sha, box_key((x1, y1, x2, y2))) for sha, x1, y1, x2, y2 in con.execute(
            "SELECT d.sha256, d.x1, d.y1, d.x2, d.y2 FROM detections d JOIN decisions c ON c.sha256 = d.sha256 "
            "AND c.idx = d.idx")}
        view = review_view(gallery, frames) if gallery is not None else {}
        labels: set[str] = set()
        events: dict[int, _Event] = {}
        n_obs = 0
        with atomic_text(pkg / "observations.csv") as fh:
            w = csv.DictWriter(fh, COLUMNS["observations"])
            w.writeheader()
            rows = con.execute(
                "SELECT i.sha256, i.path, i.camera, i.captured, i.captured_ts, i.utc_offset, i.event_id, i.width, "
                "i.height, d.idx, d.category, d.conf, d.x1, d.y1, d.x2, d.y2, c.decision, c.identity, c.score, "
                f"c.model_id, c.decided, c.track, c.species, {decision_probability(con)} "
                "FROM images i LEFT JOIN detections d ON d.sha256 = i.sha256 "
                "LEFT JOIN decisions c ON c.sha256 = d.sha256 AND c.idx = d.idx "
                "ORDER BY i.camera, i.captured_ts, i.path, d.idx")
            current: str | None = None
            image_rows: list[dict] = []
            image_counts: dict[tuple[str, str], int] = {}
            blank_by: tuple[str, str] | None = None

            def flush(ev: _Event | None, base: dict, sorted_as: str | None) -> None:
                nonlocal n_obs, blank_by
                if sorted_as and not any(r["observationType"] == "animal" for r in image_rows):
                    # a person sorted the picture into a species folder: an animal the detector did not box
                    taxon = taxa.get(sorted_as, {"scientificName": sorted_as})
                    row = {**base, "observationID": f"{base['mediaID']}_folder", "observationType": "animal",
                           "count": 1, "classificationMethod": "human", "classifiedBy": "species folder",
                           "observationComments": f"species from its folder {sorted_as}/; no box from the detector"}
                    if taxon.get("scientificName"):
                        row["scientificName"] = taxon["scientificName"]
                        labels.add(sorted_as)
                    image_rows.append(row)
                    image_counts[("animal", sorted_as)] = max(1, image_counts.get(("animal", sorted_as), 0))
                if not image_rows:
                    row = {**base, "observationID": f"{base['mediaID']}_blank", "observationType": "blank",
                           "classificationMethod": "human" if blank_by else "machine",
                           "classifiedBy": blank_by[0] if blank_by else detector}
                    if blank_by:
                        row["classificationTimestamp"] = blank_by[1]
                    image_rows.append(row)
                for r in image_rows:
                    w.writerow(r)
                    n_obs += 1
                if ev is not None:
                    for k, c in image_counts.items():
                        ev.counts[k] = max(ev.counts.get(k, 0), c)
                image_rows.clear()
                image_counts.clear()
                blank_by = None

            ev: _Event | None = None
            base: dict = {}
            sorted_as: str | None = None
            for (sha, path, cam, captured, ts_num, off, event, iw, ih, idx, cat, conf, x1, y1, x2, y2, decision,
                 identity, score, model_id, decided, track, searched, probability) in rows:
                if sha != current:
                    if current is not None:
                        flush(ev, base, sorted_as)
                    current = sha
                    sorted_as = species_of.folder(path)
                    ts = stamp(captured, off, cam)
                    ev = events.setdefault(event, _Event(cam)) if event is not None else None
                    if ev is not None:
                        ev.see(ts_num, ts)
                    base = {"deploymentID": cam, "mediaID": sha[:20], "eventID": f"{cam}-{event}", "eventStart": ts,
                            "eventEnd": ts, "observationLevel": "media"}
                if idx is None:
                    continue
                otype = OBSERVATION_TYPES.get(cat, "unknown")
                bx = _bbox(x1, y1, x2, y2, iw, ih)
                # the detector classified this box (animal / human / vehicle): its confidence is the probability
                # of that classification; an identity decision below replaces both with the embedder's
                row = {**base, "observationID": f"{sha[:20]}_{idx}", "observationType": otype, "count": 1,
                       "bboxX": bx[0], "bboxY": bx[1], "bboxWidth": bx[2], "bboxHeight": bx[3],
                       "classificationMethod": "machine", "classifiedBy": detector,
                       "classificationProbability": _num(conf, 4)}
                if otype != "animal":
                    image_counts[(otype, "")] = image_counts.get((otype, ""), 0) + 1
                    image_rows.append(row)
                    continue
                label, key, individual, human = None, None, None, None
                if decision is None:
                    label = species_of(path, cam, None, None)
                else:
                    bk = box_key((x1, y1, x2, y2))
                    res = resolver.resolve(identity, sha, bk)
                    standing = view.get((sha, bk))
                    verdict = getattr(standing, "verdict", None)
                    if verdict == "not_animal":  # a person said: no animal here; the picture may be blank
                        blank_by = (standing.who, standing.at)
                        continue
                    tags = [f"fieldreid:{decision}"]
                    row["classifiedBy"] = model_id or embedder
                    row["classificationTimestamp"] = _utc(decided)
                    # the decision's calibrated probability for the individual it names (known: that animal,
                    # new: a new animal); none without a calibration, and none for uncertain (no individual named)
                    row["classificationProbability"] = (_num(probability, 4) if probability is not None
                                                        and decision in ("known", "new") else "")
                    if verdict:
                        tags = [f"fieldreid:reviewed:{verdict}"]
                        human = (standing.who, standing.at)
                        individual = standing.identity if verdict in ("same", "new") else None
                        if verdict == "other_species" and standing.note:
                            row["observationComments"] = f"reviewed: other species ({standing.note})"
                    else:
                        if decision in ("known", "new"):
                            individual = res.identity
                            if res.human_by:
                                human = (res.human_by, res.human_at)
                                tags.append("fieldreid:confirmed")
                        elif identity:
                            said = [f"probability {probability:.3f}"] if probability is not None else []
                            said += [f"score {score:.3f}"] if score is not None else []
                            row["observationComments"] = (f"uncertain: best candidate {res.identity or identity}"
                                                          + (f" ({', '.join(said)})" if said else ""))
                    id_species = (resolver.species(individual) if individual else None)
                    label = None if verdict == "other_species" else species_of(path, cam, id_species, searched)
                    if individual:
                        row["individualID"] = individual
                    if human:
                        row.update(classificationMethod="human", classifiedBy=human[0],
                                   classificationTimestamp=_iso(human[1]), classificationProbability="")
                    row["observationTags"] = ";".join(tags)
                    key = ("id", individual) if individual else ("track", event, track)
                    if ev is not None:
                        agg = ev.individuals.setdefault(key, {"individualID": individual, "label": label,
                                                              "rows": 0, "human": None, "prob": None, "tags": set(),
                                                              "by": row["classifiedBy"], "comment": ""})
                        agg["rows"] += 1
                        agg["tags"].update(tags)
                        if human and not agg["human"]:
                            agg["human"] = (human[0], _iso(human[1]))
                        if row["classificationProbability"] and not human:
                            # one probability per track (its rows share it); the event row takes its best track's
                            p = float(row["classificationProbability"])
                            agg["prob"] = p if agg["prob"] is None else max(agg["prob"], p)
                        agg["comment"] = agg["comment"] or row.get("observationComments", "")
                if label:
                    taxon = taxa.get(label, {"scientificName": label})
                    if taxon.get("scientificName"):
                        row["scientificName"] = taxon["scientificName"]
                        labels.add(label)
                if key is None:
                    image_counts[("animal", label or "")] = image_counts.get(("animal", label or ""), 0) + 1
                image_rows.append(row)
            if current is not None:
                flush(ev, base, sorted_as)
            # event-level observations: one per event x individual, and per event for what has no individual
            for event in sorted(events):
                e = events[event]
                ebase = {"deploymentID": e.cam, "mediaID": "", "eventID": f"{e.cam}-{event}",
                         "eventStart": e.first[1], "eventEnd": e.last[1], "observationLevel": "event"}
                n = 0
                for agg in e.individuals.values():
                    n += 1
                    row = {**ebase, "observationID": f"{e.cam}-{event}-{n}", "observationType": "animal", "count": 1,
                           "observationTags": ";".join(sorted(agg["tags"]))}
                    if agg["individualID"]:
                        row["individualID"] = agg["individualID"]
                    taxon = taxa.get(agg["label"], {"scientificName": agg["label"]}) if agg["label"] else {}
                    if taxon.get("scientificName"):
                        row["scientificName"] = taxon["scientificName"]
                    if agg["human"]:
                        row.update(classificationMethod="human", classifiedBy=agg["human"][0],
                                   classificationTimestamp=agg["human"][1])
                    else:
                        row.update(classificationMethod="machine", classifiedBy=agg["by"])
                        if agg["prob"] is not None:
                            row["classificationProbability"] = _num(agg["prob"], 4)
                    if agg["comment"]:
                        row["observationComments"] = agg["comment"]
                    w.writerow(row)
                for (otype, label), count in sorted(e.counts.items()):
                    n += 1
                    row = {**ebase, "observationID": f"{e.cam}-{event}-{n}", "observationType": otype, "count": count,
                           "classificationMethod": "machine", "classifiedBy": detector}
                    taxon = taxa.get(label, {"scientificName": label}) if label else {}
                    if taxon.get("scientificName"):
                        row["scientificName"] = taxon["scientificName"]
                    w.writerow(row)
                if n == 0:
                    n += 1
                    w.writerow({**ebase, "observationID": f"{e.cam}-{event}-{n}", "observationType": "blank",
                                "classificationMethod": "machine", "classifiedBy": detector})
                n_obs += n
        # -- deployments
        coords = []
        dep_stamps: list[str] = []
        with atomic_text(pkg / "deployments.csv") as fh:
            w = csv.DictWriter(fh, COLUMNS["deployments"], extrasaction="ignore")
            w.writeheader()
            for cam, _t0, _t1, lat, lon, model, make, _n in cams:
                g = given.get(cam)
                row = dict(g or {})
                row["deploymentID"] = cam
                guesses = guessed.setdefault(cam, [])
                if not row.get("locationID"):
                    row["locationID"] = cam
                    if g is None or "locationID" not in g:
                        guesses.insert(0, "locationID (= deploymentID)")
                row["locationName"] = row.get("locationName") or cam
                if not (row.get("latitude") and row.get("longitude")) and lat is not None:
                    row["latitude"], row["longitude"] = f"{lat:.5f}", f"{lon:.5f}"
                    guesses.append("latitude/longitude (mean EXIF GPS of its images)")
                if row.get("latitude") and row.get("longitude"):
                    coords.append((float(row["latitude"]), float(row["longitude"])))
                else:
                    warnings.append(f"deployment {cam!r} has no latitude/longitude (required by Camtrap DP): pass "
                                    "--deployments CSV with deploymentID, latitude, longitude.")
                for col, seen in (("deploymentStart", starts.get(cam)), ("deploymentEnd", ends.get(cam))):
                    if row.get(col):
                        row[col] = _stamp_text(row[col], dep_offset[cam], f"{o.deployments_csv} {cam} {col}")
                    else:
                        row[col] = seen
                        guesses.append(f"{col} ({'first' if col.endswith('Start') else 'last'} image)")
                dep_stamps += [row["deploymentStart"], row["deploymentEnd"]]
                if not row.get("cameraModel") and (make or model):
                    row["cameraModel"] = "-".join(v for v in (make, model) if v)
                if guesses and not row.get("deploymentComments"):
                    row["deploymentComments"] = "fieldreid guessed: " + "; ".join(guesses)
                w.writerow(row)
        for cam, guesses in guessed.items():
            if guesses:
                warnings.append(f"deployment {cam!r}: guessed {', '.join(guesses)}; give them with --deployments CSV.")
        # -- descriptor
        title_text = o.title or project_meta.get("title") or f"fieldreid watch of {root.name}"
        if not contributors:
            who = os.environ.get("FIELDREID_USER") or _user()
            contributors = [{"title": who, "role": "contact"}]
            warnings.append(f"contributors: only {who!r} (this computer's user) as contact; pass --contributor "
                            "'Name <email> (role)' or a --project file.")
        if not licenses:
            warnings.append("no licences: pass --data-license and --media-license (e.g. CC0-1.0, CC-BY-4.0) before "
                            "publishing the package.")
        project = {"title": title_text, "samplingDesign": "opportunistic", "captureMethod": ["activityDetection"],
                   "individualAnimals": True, "observationLevel": ["media", "event"]}
        given_project = project_meta.get("project") or {}
        if not given_project.get("samplingDesign"):
            warnings.append("project.samplingDesign 'opportunistic' is a guess: set it in a --project file "
                            f"({', '.join(SAMPLING_DESIGNS)}).")
        project.update(given_project)
        taxonomic = []
        for label in sorted(labels, key=lambda lb: taxa.get(lb, {}).get("scientificName", lb)):
            if label in taxa:
                taxonomic.append(taxa[label])
            else:
                taxonomic.append({"scientificName": label, "vernacularNames": {"eng": label}})
        if taxonomic and not {lb for lb in labels if lb in taxa} == labels:
            missing = sorted(lb for lb in labels if lb not in taxa)
            warnings.append(f"species label(s) {', '.join(missing)} written as scientific and vernacular names: "
                            "name them with --taxa CSV (species,scientificName,vernacularName).")
        descriptor: dict = {
            "resources": [{"name": t, "path": f"{t}.csv", "profile": "tabular-data-resource", "format": "csv",
                           "mediatype": "text/csv", "encoding": "utf-8", "schema": f"{BASE}/{t}-table-schema.json"}
                          for t in ("deployments", "media", "observations")],
            "profile": PROFILE,
            "name": "fieldreid-" + (re.sub(r"[^a-z0-9._-]+", "-", root.name.lower()).strip("-") or "watch"),
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"fieldreid:{root}")),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "title": title_text,
            "contributors": contributors,
            "sources": [{"title": "fieldreid", "version": _version()}],
            "project": project,
            "temporal": {"start": min(dep_stamps)[:10], "end": max(dep_stamps)[:10]} if dep_stamps else None,
            "taxonomic": taxonomic,
        }
        if licenses:
            descriptor["licenses"] = licenses
        for k in ("description", "keywords", "homepage", "bibliographicCitation", "coordinatePrecision",
                  "relatedIdentifiers", "references", "image", "version"):
            if k in project_meta:
                descriptor[k] = project_meta[k]
        if coords:
            lats, lons = [c[0] for c in coords], [c[1] for c in coords]
            if len(set(coords)) == 1:
                descriptor["spatial"] = {"type": "Point", "coordinates": [lons[0], lats[0]]}
            else:
                descriptor["spatial"] = {"type": "Polygon", "coordinates": [[
                    [min(lons), min(lats)], [max(lons), min(lats)], [max(lons), max(lats)], [min(lons), max(lats)],
                    [min(lons), min(lats)]]]}
        else:
            warnings.append("no deployment coordinates: the package's spatial extent (required) is missing.")
        if descriptor["temporal"] is None:
            del descriptor["temporal"]
        descriptor["fieldreid"] = {"detector": detector, "embedder": embedder, "media": n_media,
                                   "observations": n_obs, "gallery": str(gallery) if gallery else None}
        with atomic_text(pkg / "datapackage.json") as fh:
            fh.write(json.dumps(descriptor, indent=2, ensure_ascii=False) + "\n")
        return pkg / "datapackage.json", warnings
    finally:
        db.close()


def _iso(at: str | None) -> str | None:
    from fieldreid.report.identities import iso_time

    return iso_time(at)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "fieldreid user"


def _version() -> str:
    from fieldreid import __version__

    return __version__
