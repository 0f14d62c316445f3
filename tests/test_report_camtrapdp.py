"""`fieldreid report`: Camtrap DP 1.0.2 packages that the standard's own validators and the R readers accept.

The package is made by the real CLI from a `watch --once` run over a copy of the camtrapR sample stations
(``Station/SPECIES/…``) and checked with the official profile and table schemas read in place from
``../shared/standards/camtrap-dp-1.0.2`` (jsonschema + frictionless, offline: tests/camtrapdp_validate.py).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from camtrapdp_validate import available, profile_errors, table_errors, validate
from md_format import check_md_output

from fieldreid.report.camtrapdp import FILE_PATH_RE, columns

pytest.importorskip("frictionless")
pytest.importorskip("jsonschema")
if not available():
    pytest.skip("Camtrap DP 1.0.2 standard files not found in ../shared/standards", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
STATIONS = ROOT.parent / "shared" / "data" / "camtrap" / "camtrapr-stations"
EXAMPLE = ROOT.parent / "shared" / "data" / "camtrap" / "camtrapdp-example"
OLD = time.time() - 7200
TAXA = ("species,scientificName,vernacularName,taxonRank\nVTA,Viverra tangalunga,Malay civet,species\n"
        "MNE,Macaca nemestrina,Southern pig-tailed macaque,species\nPBE,Prionailurus bengalensis,Leopard cat,species\n"
        "EGY,Echinosorex gymnura,Moonrat,species\nTRA,Tragulus,Mouse-deer,genus\nUNID,,,\n")
DEPLOYMENTS = ("deploymentID,locationID,latitude,longitude,deploymentStart,deploymentEnd,setupBy,utcOffset\n"
               "StationA,LocA,5.1,116.2,2009-04-01T08:00:00,2009-06-01T08:00:00,Ann,+08:00\n"
               "StationB,LocB,5.2,116.3,2009-04-01T08:00:00,2009-06-01T08:00:00,Ann,+08:00\n"
               "StationC,LocC,5.3,116.4,2009-04-01T08:00:00,2009-06-01T08:00:00,Ann,+08:00\n")


_MODELS: dict[str, str] = {}  # FIELDREID_MODELS for the CLI runs, set by the ``stations`` fixture


def _env(base: Path) -> dict:
    return {**os.environ, "FIELDREID_CONFIG": str(base / "no-config.toml"), "FIELDREID_USER": "tester",
            "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", **_MODELS}


def fieldreid(base: Path, *args, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "fieldreid.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=600, env=_env(base), cwd=ROOT)
    if ok:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def stations(tmp_path_factory, models_folder) -> Path:
    """`fieldreid watch --once` over a copy of the camtrapR stations; the package may be written next to it."""
    if not STATIONS.is_dir():
        pytest.skip(f"camtrapR sample stations not found at {STATIONS}")
    _MODELS["FIELDREID_MODELS"] = str(models_folder)
    base = tmp_path_factory.mktemp("stations")
    shutil.copytree(STATIONS, base / "cards")
    for p in (base / "cards").rglob("*"):
        os.utime(p, (OLD, OLD))
    # --conf 0.15: the stations are 100 x 75 thumbnails whose animals yolov5n scores around 0.2, and such scores
    # move by a few hundredths with the letterbox (square or rectangle); the tests need several individuals.
    fieldreid(base, "watch", base / "cards", "--once", "-g", base / "g.db", "-o", base / "out", "--settle", "0",
              "--threads", "2", "--conf", "0.15")
    (base / "in").mkdir()
    (base / "in" / "taxa.csv").write_text(TAXA)
    (base / "in" / "deployments.csv").write_text(DEPLOYMENTS)
    return base


def _report(base: Path, pkg: Path, *extra, ok: bool = True) -> subprocess.CompletedProcess:
    return fieldreid(base, "report", base / "out", "--camtrap-dp", pkg, *extra, ok=ok)


def _full(base: Path, pkg: Path, *extra) -> subprocess.CompletedProcess:
    return _report(base, pkg, "--species-level", "2", "--taxa", base / "in" / "taxa.csv", "--deployments",
                   base / "in" / "deployments.csv", "--contributor", "Ann Lee <ann@example.org> (principalInvestigator)",
                   "--data-license", "CC0-1.0", "--media-license", "CC-BY-4.0", *extra)


def _rows(pkg: Path, table: str) -> list[dict]:
    with (pkg / f"{table}.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_package_from_a_watch_run_validates_with_the_official_profile_and_schemas(stations):
    pkg = stations / "pkg"
    _full(stations, pkg)
    prof, tables = validate(pkg)
    assert prof == [] and tables == [], (prof, tables[:10])
    desc = json.loads((pkg / "datapackage.json").read_text())
    assert {lic["scope"] for lic in desc["licenses"]} == {"data", "media"}
    assert desc["contributors"] == [{"title": "Ann Lee", "email": "ann@example.org", "role": "principalInvestigator"}]
    assert desc["spatial"]["type"] == "Polygon" and desc["temporal"] == {"start": "2009-04-01", "end": "2009-06-01"}
    assert desc["project"]["observationLevel"] == ["media", "event"]
    assert list(_rows(pkg, "observations")[0]) == columns("observations")
    media = _rows(pkg, "media")
    assert len(media) == 42 and all(FILE_PATH_RE.match(m["filePath"]) for m in media)
    assert all(m["timestamp"].endswith("+08:00") for m in media)  # the deployment's utcOffset (no EXIF offset)
    assert all(json.loads(m["exifData"])["timeSource"] == "DateTimeOriginal" for m in media)


def test_camtrapR_needs_locationID_and_it_defaults_to_the_deployment_with_the_guesses_named(stations):
    pkg = stations / "pkg-bare"
    res = _report(stations, pkg)
    deps = _rows(pkg, "deployments")
    assert [(d["deploymentID"], d["locationID"]) for d in deps] == [(s, s) for s in ("StationA", "StationB",
                                                                                    "StationC")]
    assert all("locationID" in d["deploymentComments"] and "deploymentStart" in d["deploymentComments"]
               for d in deps)
    # camtrapR stops without vernacular names: animals of no known species are Animalia, named
    desc = json.loads((pkg / "datapackage.json").read_text())
    assert desc["taxonomic"] == [{"scientificName": "Animalia", "taxonRank": "kingdom",
                                  "vernacularNames": {"eng": "animal"}}]
    assert all(o["scientificName"] == "Animalia" for o in _rows(pkg, "observations") if o["observationType"] == "animal")
    err = " ".join(res.stderr.split())
    assert "guessed locationID" in err and "UTC offset" in err and "--deployments" in err
    # without coordinates the official schemas reject it, and the report said so
    assert "no latitude/longitude" in err
    prof, tables = validate(pkg)
    assert any("spatial" in p for p in prof)
    assert {(t, f, kind) for t, _, f, kind, _ in tables} == {("deployments", "latitude", "constraint-error"),
                                                           ("deployments", "longitude", "constraint-error")}
    with_csv = stations / "pkg"
    if not (with_csv / "deployments.csv").is_file():
        _full(stations, with_csv)
    assert [d["locationID"] for d in _rows(with_csv, "deployments")] == ["LocA", "LocB", "LocC"]
    assert all(d["setupBy"] == "Ann" and d["deploymentStart"] == "2009-04-01T08:00:00+08:00"
               for d in _rows(with_csv, "deployments"))


def test_camtrapR_vernacular_names_and_camtrapdp_taxa_come_from_the_species_folders(stations):
    pkg = stations / "pkg-taxa"
    _full(stations, pkg)
    desc = json.loads((pkg / "datapackage.json").read_text())
    taxa = {t["scientificName"]: t for t in desc["taxonomic"]}
    obs = _rows(pkg, "observations")
    names = {o["scientificName"] for o in obs if o["scientificName"]}
    assert names and names == set(taxa)
    assert all(t["vernacularNames"]["eng"] for t in taxa.values())
    assert taxa["Viverra tangalunga"]["vernacularNames"] == {"eng": "Malay civet"}
    media = {m["mediaID"]: m["filePath"] for m in _rows(pkg, "media")}
    for o in obs:  # each media-level name is the folder the picture was sorted into
        if o["observationLevel"] == "media" and o["scientificName"]:
            folder = media[o["mediaID"]].split("/")[-2]
            assert o["scientificName"] == {"VTA": "Viverra tangalunga", "MNE": "Macaca nemestrina",
                                           "PBE": "Prionailurus bengalensis", "EGY": "Echinosorex gymnura",
                                           "TRA": "Tragulus"}[folder]
    assert not any(o["scientificName"] for o in obs if "/UNID/" in media.get(o["mediaID"], ""))


def test_camtraptor_event_rows_cover_every_event_and_camtrapdp_links_every_image(stations):
    pkg = stations / "pkg-events"
    _full(stations, pkg)
    obs = _rows(pkg, "observations")
    events = [o for o in obs if o["observationLevel"] == "event"]
    media_level = [o for o in obs if o["observationLevel"] == "media"]
    assert {o["eventID"] for o in events} == {o["eventID"] for o in media_level}
    assert all(o["mediaID"] == "" and int(o["count"] or 1) >= 1 for o in events)
    animals = [o for o in events if o["observationType"] == "animal"]
    folders: dict[str, set[str]] = {}
    files = {m["mediaID"]: m["filePath"] for m in _rows(pkg, "media")}
    for o in media_level:
        folders.setdefault(o["eventID"], set()).add(files[o["mediaID"]].split("/")[-2])
    assert animals and all(o["scientificName"] or folders[o["eventID"]] == {"UNID"} for o in animals)
    # one row per event x individual: an individual appears at most once in an event
    keyed = [(o["eventID"], o["individualID"]) for o in animals if o["individualID"]]
    assert keyed and len(keyed) == len(set(keyed))
    # camtrapdp links media to events by deployment and eventStart <= timestamp <= eventEnd
    from datetime import datetime

    def t(s):
        return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S%z")

    spans = [(o["deploymentID"], t(o["eventStart"]), t(o["eventEnd"])) for o in events]
    for m in _rows(pkg, "media"):
        assert any(d == m["deploymentID"] and a <= t(m["timestamp"]) <= b for d, a, b in spans), m["fileName"]


def test_media_paths_relative_inside_the_package_or_under_a_media_base(stations):
    pkg = stations  # the package folder holds cards/: paths relative to it
    _full(stations, pkg)
    media = _rows(pkg, "media")
    assert all(m["filePath"].startswith("cards/Station") and (pkg / m["filePath"]).is_file() for m in media)
    assert validate(pkg) == ([], [])
    for name in ("datapackage.json", "deployments.csv", "media.csv", "observations.csv"):
        (pkg / name).unlink()
    other = stations / "pub"
    _full(stations, other, "--media-base", "https://data.example.org/cards")
    media = _rows(other, "media")
    assert all(m["filePath"].startswith("https://data.example.org/cards/Station") for m in media)
    assert any("%28" in m["filePath"] for m in media)  # '(' in the sample names, URL-encoded
    assert validate(other) == ([], [])
    res = _report(stations, stations / "bad", "--media-base", "../cards", ok=False)
    assert res.returncode != 0 and "--media-base" in res.stderr and "Traceback" not in res.stderr


def test_licences_contributors_and_project_from_a_project_file(stations):
    project = stations / "project.json"
    project.write_text(json.dumps({
        "title": "Sabah stations", "description": "camtrapR sample",
        "contributors": [{"title": "Ann Lee", "role": "contact"}, {"title": "Lab", "role": "rightsHolder"}],
        "licenses": [{"name": "CC0-1.0", "scope": "data"}, {"name": "CC-BY-4.0", "scope": "media"}],
        "project": {"title": "Sabah", "samplingDesign": "systematicRandom"}}))
    pkg = stations / "pkg-project"
    res = _report(stations, pkg, "--project", project, "--deployments", stations / "in" / "deployments.csv",
                  "--species-level", "2", "--taxa", stations / "in" / "taxa.csv")
    desc = json.loads((pkg / "datapackage.json").read_text())
    assert desc["title"] == "Sabah stations" and desc["project"]["samplingDesign"] == "systematicRandom"
    assert [c["role"] for c in desc["contributors"]] == ["contact", "rightsHolder"]
    assert "samplingDesign" not in res.stderr and "contributors" not in res.stderr
    assert validate(pkg) == ([], [])
    one = _report(stations, stations / "pkg-one", "--data-license", "CC0-1.0", ok=False)
    assert one.returncode != 0 and "--media-license" in one.stderr
    bad = stations / "bad-deployments.csv"
    bad.write_text("deploymentID,latitude,longitude\nStationA,north,116\n")
    res = _report(stations, stations / "pkg-bad", "--deployments", bad, ok=False)
    assert res.returncode != 0 and "latitude 'north'" in res.stderr and "Traceback" not in res.stderr


def test_gallery_merges_and_confirmations_reach_every_export(stations, tmp_path):
    base = tmp_path
    shutil.copytree(stations / "out", base / "out")
    shutil.copy(stations / "g.db", base / "g.db")
    g = base / "g.db"
    obs0 = {o["observationID"]: o for o in _rows(_report_to(stations, base, "p0"), "observations")}
    ids = sorted({o["individualID"] for o in obs0.values() if o["individualID"]})
    assert len(ids) >= 2, ids
    first, second = ids[0], ids[1]
    fieldreid(base, "gallery", "merge", second, "--into", first, "--gallery", g)
    fieldreid(base, "gallery", "confirm", first, "--as", "civet-0001", "--gallery", g)
    pkg = _report_to(stations, base, "p1", "--gallery", g, "--html", base / "r.html",
                     "--megadetector", base / "md.json")
    obs = {o["observationID"]: o for o in _rows(pkg, "observations")}
    moved = [k for k, o in obs0.items() if o["individualID"] in (first, second)]
    assert moved and all(obs[k]["individualID"] == "civet-0001" for k in moved)
    assert all((obs[k]["classificationMethod"], obs[k]["classifiedBy"]) == ("human", "tester") for k in moved)
    assert all(obs[k]["classificationTimestamp"].endswith("Z") for k in moved)
    assert not any(o["individualID"] in (first, second) for o in obs.values())
    untouched = [k for k, o in obs0.items() if o["individualID"] and k not in moved]
    assert all(obs[k]["classificationMethod"] == "machine" for k in untouched)
    assert validate(pkg) == ([], [])
    page = (base / "r.html").read_text()
    assert second not in page
    md = json.loads((base / "md.json").read_text())
    assert check_md_output(md) == ([], [])
    assert "civet-0001" in md["classification_categories"].values()
    assert second not in md["classification_categories"].values()


def _report_to(stations: Path, base: Path, name: str, *extra) -> Path:
    pkg = base / name
    fieldreid(base, "report", base / "out", "--camtrap-dp", pkg, "--deployments", stations / "in" / "deployments.csv",
              "--species-level", "2", "--taxa", stations / "in" / "taxa.csv", "--data-license", "CC0-1.0",
              "--media-license", "CC0-1.0", *extra)
    return pkg


def test_classification_probability_is_never_a_cosine_or_the_detectors_for_an_identity(stations):
    """The stations' gallery holds no calibration: an identified animal's row has no probability (it carried
    the detector's confidence for a new animal and a cosine for a known one); a detection without an identity
    decision keeps the detector's confidence, the probability of its observation type, which the detector
    classified. With a calibration: tests/test_probability.py."""
    import sqlite3

    from fieldreid.report.camtrapdp import _num

    pkg = stations / "pkg-probability"
    _full(stations, pkg)
    con = sqlite3.connect(stations / "out" / "results.db")
    decided = {f"{sha[:20]}_{idx}" for sha, idx in con.execute("SELECT sha256, idx FROM decisions")}
    conf = {f"{sha[:20]}_{idx}": c for sha, idx, c in con.execute("SELECT sha256, idx, conf FROM detections")}
    [detector] = con.execute("SELECT value FROM meta WHERE key = 'detector'").fetchone()
    con.close()
    obs = _rows(pkg, "observations")
    media = [o for o in obs if o["observationLevel"] == "media" and o["observationID"] in conf]
    identified = [o for o in media if o["observationID"] in decided]
    assert identified and all(o["classificationProbability"] == "" for o in identified)
    assert all(o["classifiedBy"] != detector for o in identified)
    typed = [o for o in media if o["observationID"] not in decided]  # here: a person and four vehicles
    assert typed and all(o["classifiedBy"] == detector for o in typed)
    assert all(o["classificationProbability"] == _num(conf[o["observationID"]], 4) for o in typed)
    assert all(o["classificationProbability"] == "" for o in obs if o["observationLevel"] == "event"
               and o["individualID"])


def test_watch_detections_json_carries_individuals_as_classifications(stations):
    md = json.loads((stations / "out" / "detections.json").read_text())
    assert check_md_output(md) == ([], [])
    cats = md["classification_categories"]
    assert cats and set(md["classification_category_descriptions"]) == set(cats)
    classified = [d for im in md["images"] for d in im.get("detections") or [] if "classifications" in d]
    assert classified and all(d["category"] == "1" and d["classifications"][0][0] in cats for d in classified)


def test_the_standards_own_example_validates_cleanly():
    if not EXAMPLE.is_dir():
        pytest.skip(f"Camtrap DP example not found at {EXAMPLE}")
    assert validate(EXAMPLE) == ([], [])


def test_the_validator_rejects_what_the_issue_found(tmp_path):
    """The checks can fail: no spatial, one licence, a '../' media path, missingValues honoured."""
    if not EXAMPLE.is_dir():
        pytest.skip(f"Camtrap DP example not found at {EXAMPLE}")
    desc = json.loads((EXAMPLE / "datapackage.json").read_text())
    del desc["spatial"]
    desc["licenses"] = desc["licenses"][:1]
    errs = " | ".join(profile_errors(desc))
    assert "'spatial' is a required property" in errs and "licenses" in errs
    for name in ("deployments.csv", "media.csv", "observations.csv"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    media = (tmp_path / "media.csv").read_text().splitlines()
    head, first, *rest = media
    cells = first.split(",")
    cells[4] = "../media/x.jpg"
    (tmp_path / "media.csv").write_text("\n".join([head, ",".join(cells), *rest]) + "\n")
    errors = table_errors(tmp_path)
    assert [(t, f, kind) for t, _, f, kind, _ in errors] == [("media", "filePath", "constraint-error")]
    obs = (tmp_path / "observations.csv").read_text().replace(",Anas platyrhynchos,", ",NA,", 1)
    (tmp_path / "observations.csv").write_text(obs)  # 'NA' is a missing value in the official schemas
    assert [(t, f) for t, _, f, _, _ in table_errors(tmp_path)] == [("media", "filePath")]


def test_html_report_is_self_contained(stations, tmp_path):
    page = tmp_path / "report.html"
    fieldreid(tmp_path, "report", stations / "out", "--html", page)
    text = page.read_text()
    import re
    import sqlite3

    assert not re.search(r"""(src|href)=["']?(https?:|file:|/)""", text)
    con = sqlite3.connect(stations / "out" / "results.db")
    n = con.execute("SELECT count(*) FROM decisions WHERE representative = 1 AND decision IN ('new', 'uncertain')"
                    ).fetchone()[0]
    assert text.count('<div class="animal ') == n and n >= 1
    assert "data:image/jpeg;base64," in text


def test_species_from_option_camera_file_and_gallery_identity(stations, tmp_path):
    """Order: --species, --species-level folder, the identity's species in the gallery, CAMERA/.fieldreid-species."""
    from fieldreid.gallery import Gallery
    from fieldreid.report.camtrapdp import Options, write_package

    shutil.copytree(stations / "out", tmp_path / "out")
    shutil.copy(stations / "g.db", tmp_path / "g.db")
    (stations / "cards" / "StationC" / ".fieldreid-species").write_text("TRA\n")
    try:
        with Gallery(tmp_path / "g.db", who="tester") as g:
            animals = [i.id for i in g.identities() if i.species == "animal"]
            g.add_identity("civet-0001", "VTA")
            g.merge([animals[0]], "civet-0001")
        opts = Options(gallery=tmp_path / "g.db", taxa_csv=stations / "in" / "taxa.csv")
        write_package(tmp_path / "out", tmp_path / "a", options=opts)
        media = {m["mediaID"]: m["filePath"] for m in _rows(tmp_path / "a", "media")}
        obs = [o for o in _rows(tmp_path / "a", "observations") if o["observationLevel"] == "media"]
        merged = [o for o in obs if o["individualID"] == "civet-0001"]
        assert merged and all(o["scientificName"] == "Viverra tangalunga" for o in merged)
        rest = [o for o in obs if o["observationType"] == "animal" and o["individualID"] != "civet-0001"]
        assert rest and all(o["scientificName"] == ("Tragulus" if "/StationC/" in media[o["mediaID"]] else "Animalia")
                            for o in rest)
        write_package(tmp_path / "out", tmp_path / "b", options=Options(gallery=tmp_path / "g.db", species="MNE"))
        animals_b = [o for o in _rows(tmp_path / "b", "observations") if o["observationType"] == "animal"]
        assert animals_b and {o["scientificName"] for o in animals_b} == {"MNE"}
        desc = json.loads((tmp_path / "b" / "datapackage.json").read_text())
        assert desc["taxonomic"] == [{"scientificName": "MNE", "vernacularNames": {"eng": "MNE"}}]
    finally:
        (stations / "cards" / "StationC" / ".fieldreid-species").unlink()


def test_an_unreadable_gallery_is_warned_and_the_package_still_written(stations, tmp_path):
    from fieldreid.report.camtrapdp import Options, write_package

    junk = tmp_path / "g.db"
    junk.write_bytes(b"not a gallery at all" * 100)
    path, warnings = write_package(stations / "out", tmp_path / "pkg", options=Options(gallery=junk))
    assert path.is_file() and any("could not be read" in w and "as watch recorded" in w for w in warnings)
    obs = _rows(tmp_path / "pkg", "observations")
    assert any(o["individualID"].startswith("animal-P") for o in obs)  # watch's own identities
