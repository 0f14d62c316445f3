"""Camtrap DP 1.0 (TDWG) package from a watch output folder: deployments, media, observations.

* one **deployment** per camera folder; ``latitude``/``longitude`` (required by the standard) come from
  ``--deployments`` (a CSV with ``deploymentID`` = camera folder name and any deployment columns), else
  from EXIF GPS when the camera wrote it; a camera with neither is written with empty coordinates and a
  warning, since the package is then not valid Camtrap DP.
* one **media** row per processed image (duplicates are the same picture and are left out; failed files
  have no media row). ``mediaID`` = the first 20 hex digits of the image's sha256, stable across re-runs.
* media-level **observations**: one per detection (``animal`` / ``human`` / ``vehicle``, with bbox) and one
  ``blank`` per image without detections. Animals carry the watch decision: ``individualID`` = the
  identity for ``known`` and ``new`` (a provisional id), empty for ``uncertain`` (the best candidate and
  score go to ``observationComments`` for review); ``classificationMethod = machine``, ``classifiedBy`` =
  the embedder's model id (the detector's for non-animals), ``classificationProbability`` = the cosine
  score of the matched identity for known/uncertain, else the detector confidence. Scores are cosines,
  not calibrated probabilities; the standard has no better field.
* timestamps need a UTC offset: EXIF ``OffsetTimeOriginal`` when present, else ``--utc-offset``.
* file names are the watch's text form (:func:`fieldreid.storage.fsutil.path_text`): a name that is not UTF-8
  has ``\\xNN`` for each undecodable byte (and ``\\\\`` for a backslash) in ``filePath`` and ``fileName``.

The table schemas below are the Camtrap DP 1.0 field lists (names, types, constraints) transcribed from
the standard, used by the tests to validate what is written with ``frictionless`` (the official schema
URLs cannot be fetched offline). ``datapackage.json`` itself names the official schema and profile URLs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

from fieldreid.errors import FieldreidError
from fieldreid.report.tables import atomic_text
from fieldreid.storage.fsutil import path_text, text_path
from fieldreid.watch.state import StateDB

VERSION = "1.0.2"
BASE = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}"
PROFILE = f"{BASE}/camtrap-dp-profile.json"
DATETIME = "%Y-%m-%dT%H:%M:%S%z"
MEDIATYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".tif": "image/tiff",
              ".tiff": "image/tiff", ".bmp": "image/bmp", ".webp": "image/webp"}


def _f(name: str, type_: str, required: bool = False, **constraints) -> dict:
    field: dict = {"name": name, "type": type_}
    if type_ == "datetime":
        field["format"] = DATETIME
    c = dict(constraints)
    if required:
        c["required"] = True
    if c:
        field["constraints"] = c
    return field


SCHEMAS: dict[str, dict] = {
    "deployments": {"fields": [
        _f("deploymentID", "string", True, unique=True), _f("locationID", "string"), _f("locationName", "string"),
        _f("latitude", "number", True, minimum=-90, maximum=90),
        _f("longitude", "number", True, minimum=-180, maximum=180),
        _f("coordinateUncertainty", "integer", minimum=1), _f("deploymentStart", "datetime", True),
        _f("deploymentEnd", "datetime", True), _f("setupBy", "string"), _f("cameraID", "string"),
        _f("cameraModel", "string"), _f("cameraDelay", "integer", minimum=0), _f("cameraHeight", "number", minimum=0),
        _f("cameraDepth", "number", minimum=0), _f("cameraTilt", "integer", minimum=-90, maximum=90),
        _f("cameraHeading", "integer", minimum=0, maximum=360), _f("detectionDistance", "number", minimum=0),
        _f("timestampIssues", "boolean"), _f("baitUse", "boolean"),
        _f("featureType", "string", enum=["roadPaved", "roadDirt", "trailHiking", "trailGame", "roadUnderpass",
                                          "roadOverpass", "roadBridge", "culvert", "burrow", "nestSite", "carcass",
                                          "waterSource", "fruitingTree"]),
        _f("habitat", "string"), _f("deploymentGroups", "string"), _f("deploymentTags", "string"),
        _f("deploymentComments", "string")],
        "primaryKey": ["deploymentID"]},
    "media": {"fields": [
        _f("mediaID", "string", True, unique=True), _f("deploymentID", "string", True),
        _f("captureMethod", "string", enum=["activityDetection", "timeLapse"]), _f("timestamp", "datetime", True),
        _f("filePath", "string", True), _f("filePublic", "boolean", True), _f("fileName", "string"),
        _f("fileMediatype", "string", True, pattern="^(image|video|audio)/.*$"), _f("exifData", "object"),
        _f("favorite", "boolean"), _f("mediaComments", "string")],
        "primaryKey": ["mediaID"],
        "foreignKeys": [{"fields": "deploymentID", "reference": {"resource": "deployments", "fields": "deploymentID"}}]},
    "observations": {"fields": [
        _f("observationID", "string", True, unique=True), _f("deploymentID", "string", True), _f("mediaID", "string"),
        _f("eventID", "string"), _f("eventStart", "datetime", True), _f("eventEnd", "datetime", True),
        _f("observationLevel", "string", True, enum=["media", "event"]),
        _f("observationType", "string", True, enum=["animal", "human", "vehicle", "blank", "unknown", "unclassified"]),
        _f("cameraSetupType", "string", enum=["setup", "calibration"]), _f("scientificName", "string"),
        _f("count", "integer", minimum=1), _f("lifeStage", "string", enum=["adult", "subadult", "juvenile"]),
        _f("sex", "string", enum=["female", "male"]), _f("behavior", "string"), _f("individualID", "string"),
        _f("individualPositionRadius", "number", minimum=0),
        _f("individualPositionAngle", "number", minimum=-90, maximum=90), _f("individualSpeed", "number", minimum=0),
        _f("bboxX", "number", minimum=0, maximum=1), _f("bboxY", "number", minimum=0, maximum=1),
        _f("bboxWidth", "number", minimum=1e-15, maximum=1), _f("bboxHeight", "number", minimum=1e-15, maximum=1),
        _f("classificationMethod", "string", enum=["human", "machine"]), _f("classifiedBy", "string"),
        _f("classificationTimestamp", "datetime"), _f("classificationProbability", "number", minimum=0, maximum=1),
        _f("observationTags", "string"), _f("observationComments", "string")],
        "primaryKey": ["observationID"],
        "foreignKeys": [
            {"fields": "deploymentID", "reference": {"resource": "deployments", "fields": "deploymentID"}},
            {"fields": "mediaID", "reference": {"resource": "media", "fields": "mediaID"}}]},
}
OBSERVATION_TYPES = {1: "animal", 2: "human", 3: "vehicle"}


def columns(table: str) -> list[str]:
    return [f["name"] for f in SCHEMAS[table]["fields"]]


def _stamp(captured: str, offset: str | None, default_offset: str) -> str:
    return captured + (offset or default_offset)


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v: float, digits: int = 6) -> str:
    return f"{min(1.0, max(0.0, float(v))):.{digits}f}".rstrip("0").rstrip(".") or "0"


def _bbox(x1: float, y1: float, x2: float, y2: float, w: int, h: int) -> tuple[str, str, str, str]:
    x1, x2 = max(0.0, x1), min(float(w), x2)
    y1, y2 = max(0.0, y1), min(float(h), y2)
    bw, bh = max((x2 - x1) / w, 1e-6), max((y2 - y1) / h, 1e-6)
    return _num(x1 / w), _num(y1 / h), _num(bw), _num(bh)


def _read_deployments(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    try:
        with Path(path).open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise FieldreidError(f"Cannot read deployments file {path}: {exc.strerror or exc}.") from exc
    if rows and "deploymentID" not in rows[0]:
        raise FieldreidError(f"{path} needs a deploymentID column (the camera folder names).")
    return {r["deploymentID"]: r for r in rows}


def write_package(out: Path, pkg: Path, deployments_csv: Path | None = None, utc_offset: str = "+00:00",
                  title: str | None = None) -> tuple[Path, list[str]]:
    """Write ``pkg/{datapackage.json, deployments.csv, media.csv, observations.csv}``; returns (path, warnings)."""
    from fieldreid.frames.exif import parse_offset

    offset = parse_offset(utc_offset)
    if offset is None:
        raise FieldreidError(f"--utc-offset must look like +02:00 or -0500, got {utc_offset!r}.")
    db = StateDB(Path(out) / "results.db", readonly=True)
    warnings: list[str] = []
    try:
        con = db.con
        given = _read_deployments(deployments_csv)
        root = Path(db.meta("root") or ".")  # text form (path_text) of the watched folder
        root_fs = text_path(str(root))
        embedder = db.meta("embedder") or "embedder"
        detector = db.meta("detector") or "detector"
        pkg = Path(pkg)
        pkg.mkdir(parents=True, exist_ok=True)
        no_offset = con.execute("SELECT count(*) FROM images WHERE utc_offset IS NULL").fetchone()[0]
        if no_offset:
            warnings.append(f"{no_offset} image(s) have no UTC offset in EXIF; {offset} was assumed (--utc-offset).")
        # -- deployments
        cams = con.execute(
            "SELECT camera, min(captured), max(captured), min(coalesce(utc_offset, '')), avg(latitude), avg(longitude), "
            "max(model), max(make) FROM images GROUP BY camera ORDER BY camera").fetchall()
        coords = []
        with atomic_text(pkg / "deployments.csv") as fh:
            w = csv.DictWriter(fh, columns("deployments"), extrasaction="ignore")
            w.writeheader()
            for cam, start, end, off, lat, lon, model, make in cams:
                row = dict(given.get(cam, {}))
                row["deploymentID"] = cam
                row.setdefault("locationName", cam)
                if not row.get("latitude") and lat is not None:
                    row["latitude"], row["longitude"] = f"{lat:.5f}", f"{lon:.5f}"
                if not row.get("latitude") or not row.get("longitude"):
                    warnings.append(f"deployment {cam!r} has no latitude/longitude (required by Camtrap DP): pass "
                                    "--deployments CSV with deploymentID, latitude, longitude.")
                else:
                    coords.append((float(row["latitude"]), float(row["longitude"])))
                row.setdefault("deploymentStart", _stamp(start, off or None, offset))
                row.setdefault("deploymentEnd", _stamp(end, off or None, offset))
                if not row.get("cameraModel") and (make or model):
                    row["cameraModel"] = "-".join(v for v in (make, model) if v)
                w.writerow(row)
        # -- media
        n_media = 0
        with atomic_text(pkg / "media.csv") as fh:
            w = csv.writer(fh)
            w.writerow(columns("media"))
            for sha, path, cam, captured, off, make, model, tsrc in con.execute(
                    "SELECT sha256, path, camera, captured, utc_offset, make, model, time_source FROM images "
                    "ORDER BY camera, captured, path"):
                exif = {k: v for k, v in (("Make", make), ("Model", model), ("timeSource", tsrc)) if v}
                file_path = (path_text(os.path.relpath(os.path.join(root_fs, text_path(path)), pkg.resolve()))
                             if root.is_absolute() else path)
                w.writerow([sha[:20], cam, "activityDetection", _stamp(captured, off, offset), Path(file_path).as_posix(),
                            "false", Path(path).name, MEDIATYPES.get(Path(path).suffix.lower(), "image/jpeg"),
                            json.dumps(exif) if exif else "", "", ""])
                n_media += 1
        # -- observations
        n_obs = 0
        with atomic_text(pkg / "observations.csv") as fh:
            w = csv.DictWriter(fh, columns("observations"))
            w.writeheader()
            rows = con.execute(
                "SELECT i.sha256, i.camera, i.captured, i.utc_offset, i.event_id, i.width, i.height, d.idx, d.category, "
                "d.conf, d.x1, d.y1, d.x2, d.y2, c.decision, c.identity, c.score, c.model_id, c.decided "
                "FROM images i LEFT JOIN detections d ON d.sha256 = i.sha256 LEFT JOIN decisions c ON "
                "c.sha256 = d.sha256 AND c.idx = d.idx ORDER BY i.camera, i.captured, i.path, d.idx")
            for (sha, cam, captured, off, event, iw, ih, idx, cat, conf, x1, y1, x2, y2, decision, identity, score,
                 model_id, decided) in rows:
                ts = _stamp(captured, off, offset)
                row = {"deploymentID": cam, "mediaID": sha[:20], "eventID": f"{cam}-{event}", "eventStart": ts,
                       "eventEnd": ts, "observationLevel": "media", "classificationMethod": "machine"}
                if idx is None:
                    row.update(observationID=f"{sha[:20]}_blank", observationType="blank", classifiedBy=detector)
                else:
                    bx = _bbox(x1, y1, x2, y2, iw, ih)
                    row.update(observationID=f"{sha[:20]}_{idx}", observationType=OBSERVATION_TYPES.get(cat, "unknown"),
                               count=1, bboxX=bx[0], bboxY=bx[1], bboxWidth=bx[2], bboxHeight=bx[3],
                               classifiedBy=detector, classificationProbability=_num(conf, 4))
                    if decision is not None:
                        row["classifiedBy"] = model_id or embedder
                        row["classificationTimestamp"] = _utc(decided)
                        if decision in ("known", "new") and identity:
                            row["individualID"] = identity
                        if decision in ("known", "uncertain") and score is not None:
                            row["classificationProbability"] = _num(score, 4)
                        tag = f"fieldreid:{decision}"
                        row["observationTags"] = tag
                        if decision == "uncertain" and identity:
                            row["observationComments"] = f"uncertain: best candidate {identity} (cosine {score:.3f})"
                w.writerow(row)
                n_obs += 1
        # -- descriptor
        dates = con.execute("SELECT min(captured), max(captured) FROM images").fetchone()
        descriptor: dict = {
            "resources": [{"name": t, "path": f"{t}.csv", "profile": "tabular-data-resource", "format": "csv",
                           "mediatype": "text/csv", "encoding": "utf-8", "schema": f"{BASE}/{t}-table-schema.json"}
                          for t in ("deployments", "media", "observations")],
            "profile": PROFILE,
            "name": "fieldreid-" + (re.sub(r"[^a-z0-9._-]+", "-", root.name.lower()).strip("-") or "watch"),
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"fieldreid:{root}")),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "title": title or f"fieldreid watch of {root.name}",
            "contributors": [{"title": os.environ.get("FIELDREID_USER") or "fieldreid user", "role": "contact"}],
            "sources": [{"title": "fieldreid", "version": _version()}],
            "licenses": [{"name": "CC0-1.0", "scope": "data"}],
            "project": {"title": title or f"fieldreid watch of {root.name}", "samplingDesign": "opportunistic",
                        "captureMethod": ["activityDetection"], "individualAnimals": True,
                        "observationLevel": ["media"]},
            "temporal": {"start": (dates[0] or "")[:10], "end": (dates[1] or "")[:10]},
            "taxonomic": [],
            "fieldreid": {"detector": detector, "embedder": embedder, "media": n_media, "observations": n_obs},
        }
        if coords:
            lats, lons = [c[0] for c in coords], [c[1] for c in coords]
            descriptor["spatial"] = {"type": "Polygon", "coordinates": [[
                [min(lons), min(lats)], [max(lons), min(lats)], [max(lons), max(lats)], [min(lons), max(lats)],
                [min(lons), min(lats)]]]}
        else:
            warnings.append("no deployment coordinates: the package's spatial extent is missing.")
        with atomic_text(pkg / "datapackage.json") as fh:
            fh.write(json.dumps(descriptor, indent=2) + "\n")
        return pkg / "datapackage.json", warnings
    finally:
        db.close()


def _version() -> str:
    from fieldreid import __version__

    return __version__
