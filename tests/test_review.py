"""`fieldreid review` without a browser: decisions, audit log, undo, sync queue, exports and the web app's guards.

Runs on a real watch output (tests/review_support.py: zebra photos and camera-trap frames, a gallery enrolled
from zebra crops). The browser itself is driven in tests/test_review_browser.py.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from review_support import built, fieldreid, fresh_copy

from fieldreid.gallery.store import Gallery
from fieldreid.review import actions
from fieldreid.review.queue import Filters, ReviewSource


@pytest.fixture(scope="module")
def base(tmp_path_factory, zebra, camtrap, yolov5n_onnx, default_embedder_onnx) -> Path:
    return built(tmp_path_factory, zebra, camtrap, yolov5n_onnx, default_embedder_onnx)


@pytest.fixture
def review(base, tmp_path):
    """(output folder, gallery, review source) on a fresh copy."""
    out, gpath = fresh_copy(base, tmp_path)
    g = Gallery(gpath, create=False, who="tester")
    src = ReviewSource(out, g, qc_percent=100)
    yield out, g, src
    src.close()
    g.close()


def keys(src: ReviewSource) -> dict[str, str]:
    """Photo file name -> track key (each photo is its own event here)."""
    return {Path(t["file"]).name: t["key"] for t in src.queue(Filters(status="all"))}


def dump(g: Gallery) -> dict:
    """Everything a decision may touch, exactly (vectors included)."""
    return {
        "identities": g.read("SELECT * FROM identities ORDER BY id").fetchall(),
        "embeddings": g.read("SELECT id, identity_id, model_id, vector, source, box FROM embeddings ORDER BY id").fetchall(),
        "sightings": g.read("SELECT id, identity_id, runner_up_id, decision FROM sightings ORDER BY id").fetchall(),
        "verdicts": g.read("SELECT * FROM review_sightings ORDER BY sighting_id").fetchall(),
    }


def identity_of(g: Gallery, src: ReviewSource, key: str) -> str | None:
    track = src.track_ref(key)
    return g.read("SELECT identity_id FROM sightings WHERE id = ?", (track.representative,)).fetchone()[0]


def test_the_run_gives_every_kind_of_decision_and_the_queue_puts_them_in_review_order(review):
    out, g, src = review
    items = src.queue(Filters(status="all"))
    by_file = {Path(t["file"]).name: t for t in items}
    assert by_file["IMAG0046_bobcat.JPG"]["decision"] == "new"
    assert by_file["z10_left_img-0000112.jpg"]["decision"] == "known"
    assert {t["decision"] for t in items} == {"new", "uncertain", "known"}, [(t["file"], t["decision"], t["score"])
                                                                             for t in items]
    order = [t["decision"] for t in items]
    assert order == sorted(order, key=["new", "uncertain", "known"].index)
    assert all(t["in_gallery"] and t["review"] is None for t in items)
    # filters
    assert {t["camera"] for t in src.queue(Filters(status="all", camera="southwest"))} == {"southwest"}
    assert all(t["decision"] == "uncertain" for t in src.queue(Filters(status="all", decision="uncertain")))
    assert all(0.9 <= t["score"] <= 0.95 for t in src.queue(Filters(status="all", score_min=0.9, score_max=0.95)))
    day = by_file["IMAG0046_bobcat.JPG"]["captured"][:10]
    assert [Path(t["file"]).name for t in src.queue(Filters(status="all", date_from=day, date_to=day))] == [
        "IMAG0046_bobcat.JPG"]
    # the QC sample of known animals is fixed by the track, and 0 % means none
    src.qc_percent = 0
    assert all(t["decision"] != "known" for t in src.queue())
    src.qc_percent = 100


def test_an_item_shows_the_frame_box_crop_and_candidates_of_its_species_with_photos(review):
    out, g, src = review
    k = keys(src)
    item = src.item(k["z41_left_img-0000743.jpg"])
    [frame] = item["frames"]
    x, y, w, h = frame["box"]
    assert 0 <= x < 1 and 0 <= y < 1 and 0 < w <= 1 and 0 < h <= 1
    cands = item["candidates"]
    assert 2 <= len(cands) <= 5 and all(c["species"] == "plains_zebra" for c in cands)
    assert [c["score"] for c in cands] == sorted((c["score"] for c in cands), reverse=True)
    best = cands[0]
    assert len(best["photos"]) == 4 and best["photos"][0]["score"] == pytest.approx(best["score"], abs=1e-3)
    # a new animal is not offered its own provisional identity as a candidate
    bobcat = src.item(k["IMAG0046_bobcat.JPG"])
    assert bobcat["identity"]["own"] and bobcat["identity"]["id"] not in {c["id"] for c in bobcat["candidates"]}


def test_each_verb_changes_the_gallery_and_undo_puts_back_exactly_what_was_there(review):
    out, g, src = review
    k = keys(src)
    before = dump(g)
    bobcat_prov = identity_of(g, src, k["IMAG0046_bobcat.JPG"])
    done = []
    # not this species: the provisional zebra made for a bobcat goes, the sighting names nobody
    done.append(actions.decide(g, src.track_ref(k["IMAG0046_bobcat.JPG"]), "other_species", note="bobcat"))
    assert not g.has_identity(bobcat_prov) and identity_of(g, src, k["IMAG0046_bobcat.JPG"]) is None
    # not an animal
    done.append(actions.decide(g, src.track_ref(k["2021-07-24_SYFR0655_coyote.JPG"]), "not_animal"))
    # a zebra the gallery does not know, matched to another one: split off as a new, named individual
    z41a = src.track_ref(k["z41_left_img-0000743.jpg"])
    done.append(actions.decide(g, z41a, "new", name="Stripy", new_id="zebra-0041"))
    stripy = g.get_identity("zebra-0041")
    assert (stripy.status, stripy.name, stripy.n_embeddings, stripy.species) == ("confirmed", "Stripy", 1, "plains_zebra")
    assert identity_of(g, src, k["z41_left_img-0000743.jpg"]) == "zebra-0041"
    # its second photo: same as the new individual (its embedding joins it)
    done.append(actions.decide(g, src.track_ref(k["z41_left_img-0000753.jpg"]), "same", identity="zebra-0041"))
    assert g.get_identity("zebra-0041").n_embeddings == 2
    # confirm a known match
    z10 = g.get_identity("z10").n_embeddings
    done.append(actions.decide(g, src.track_ref(k["z10_left_img-0000112.jpg"]), "same", identity="z10"))
    assert g.get_identity("z10").n_embeddings == z10 + 1
    # merge: z22's whole identity into z13 (every sighting and photo moves)
    z22 = g.get_identity("z22")
    z13 = g.get_identity("z13")
    done.append(actions.decide(g, src.track_ref(k["z22_left_img-0000408.jpg"]), "same", identity="z13",
                               whole_identity=True))
    assert not g.has_identity("z22")
    assert g.get_identity("z13").n_embeddings == z13.n_embeddings + z22.n_embeddings
    reviewed = {t["key"]: t["review"]["verdict"] for t in src.queue(Filters(status="reviewed"))}
    assert len(reviewed) == 6 and reviewed[k["IMAG0046_bobcat.JPG"]] == "other_species"
    # each decision is one 'review' change in the gallery's log, with who and what it replaced
    logged = [c for c in g.log() if c.action == "review"]
    assert len(logged) == 6 and all(c.who == "tester" for c in logged)
    assert logged[-1].details["replaced"]["identity"] == bobcat_prov
    # undo, newest first: the gallery is what it was, byte for byte
    for r in reversed(done):
        u = actions.undo(g, r.id)
        assert u.undone_by == "tester"
    after = dump(g)
    assert after == before
    assert [c.action for c in g.log(limit=6)] == ["review-undo"] * 6


def test_a_decision_is_one_transaction_a_failure_leaves_nothing(review, monkeypatch):
    out, g, src = review
    k = keys(src)
    before, version = dump(g), g.version
    from fieldreid.sync import queue

    def broken(self, items):
        raise OSError("disk gone")

    monkeypatch.setattr(queue.Outbox, "add_many", broken)  # the last step of a decision fails
    with pytest.raises(OSError):
        actions.decide(g, src.track_ref(k["z41_left_img-0000743.jpg"]), "new", name="Stripy")
    assert dump(g) == before and g.version == version
    assert actions.history(g) == []


def test_a_reviewed_track_is_refused_until_its_decision_is_undone(review):
    out, g, src = review
    k = keys(src)
    track = src.track_ref(k["z10_left_img-0000125.jpg"])
    first = actions.decide(g, track, "same", identity="z10")
    with pytest.raises(actions.AlreadyReviewed, match=r"already decided \(same\) by tester"):
        actions.decide(g, track, "new", name="Other")
    actions.undo(g, first.id)
    assert actions.decide(g, track, "same", identity="z11").identity == "z11"


def test_undo_is_refused_when_something_changed_those_rows_since(review):
    out, g, src = review
    k = keys(src)
    r = actions.decide(g, src.track_ref(k["IMAG0046_bobcat.JPG"]), "new", name="Bob")
    g.rename(r.identity, name="Robert")  # a curator on the command line, afterwards
    before = dump(g)
    with pytest.raises(actions.UndoConflict, match="has changed since"):
        actions.undo(g, r.id)
    assert dump(g) == before
    # an identity the decision created that has been used since is not taken away either
    r2 = actions.decide(g, src.track_ref(k["z41_left_img-0000743.jpg"]), "new", name="Stripy")
    actions.decide(g, src.track_ref(k["z41_left_img-0000753.jpg"]), "same", identity=r2.identity)
    with pytest.raises(actions.UndoConflict):
        actions.undo(g, r2.id)


def test_decisions_are_queued_for_sync_with_crop_and_vector_and_the_push_carries_them(review):
    out, g, src = review
    k = keys(src)
    r_new = actions.decide(g, src.track_ref(k["z41_left_img-0000743.jpg"]), "new", name="Stripy")
    r_no = actions.decide(g, src.track_ref(k["IMAG0046_bobcat.JPG"]), "not_animal")
    from fieldreid.sync.queue import Outbox

    box = Outbox(g)
    rows = g.read("SELECT sighting_id, vector, crop FROM sync_outbox ORDER BY sighting_id").fetchall()
    assert {r[0] for r in rows} == set(r_new.sightings) | set(r_no.sightings)
    assert all(v is not None and crop[:2] == b"\xff\xd8" for _, v, crop in rows)
    [chunk] = box.chunks()
    body, introduced = box.payload(chunk, "cam-a")
    sent = {s["uid"].split(":")[1]: s for s in body["sightings"]}
    assert sent[str(r_new.sightings[0])]["identity"] == r_new.identity
    assert sent[str(r_no.sightings[0])]["identity"] is None
    assert introduced == [r_new.identity]  # the device's new confirmed individual goes to the lab with it


def test_fieldreid_report_exports_what_a_person_decided(review, tmp_path):
    out, g, src = review
    k = keys(src)
    actions.decide(g, src.track_ref(k["z41_left_img-0000743.jpg"]), "new", name="Stripy", new_id="zebra-0041")
    actions.decide(g, src.track_ref(k["IMAG0046_bobcat.JPG"]), "other_species", note="bobcat")
    actions.decide(g, src.track_ref(k["2021-07-24_SYFR0655_coyote.JPG"]), "not_animal")
    (tmp_path / "deployments.csv").write_text("deploymentID,latitude,longitude\nzebra-cam,-1.29,36.82\n"
                                              "southwest,34.05,-111.9\n", encoding="utf-8")
    fieldreid("report", out, "--camtrap-dp", tmp_path / "pkg", "--deployments", tmp_path / "deployments.csv")
    obs = list(csv.DictReader((tmp_path / "pkg" / "observations.csv").open(encoding="utf-8")))
    media = {r["mediaID"]: r["fileName"] for r in csv.DictReader((tmp_path / "pkg" / "media.csv").open(encoding="utf-8"))}
    by_file: dict[str, list[dict]] = {}
    for o in obs:
        if o["observationLevel"] == "media":
            by_file.setdefault(media[o["mediaID"]], []).append(o)
    [z41] = by_file["z41_left_img-0000743.jpg"]
    assert (z41["individualID"], z41["classificationMethod"], z41["classifiedBy"]) == ("zebra-0041", "human", "tester")
    assert z41["observationTags"] == "fieldreid:reviewed:new"
    from datetime import datetime

    assert datetime.fromisoformat(z41["classificationTimestamp"].replace("Z", "+00:00")).tzinfo is not None
    [bobcat] = by_file["IMAG0046_bobcat.JPG"]
    assert (bobcat["observationType"], bobcat["individualID"], bobcat["classificationMethod"]) == ("animal", "", "human")
    assert "bobcat" in bobcat["observationComments"]
    # a detection a person called 'not an animal' is no observation; the picture is blank
    [coyote] = by_file["2021-07-24_SYFR0655_coyote.JPG"]
    assert (coyote["observationType"], coyote["classificationMethod"], coyote["bboxX"]) == ("blank", "human", "")
    # unreviewed ones stay the machine's
    [z10] = by_file["z10_left_img-0000112.jpg"]
    assert (z10["classificationMethod"], z10["individualID"]) == ("machine", "z10")
    import camtrapdp_validate

    if camtrapdp_validate.available():  # the standard's own profile and table schemas, read offline
        assert camtrapdp_validate.validate(tmp_path / "pkg") == ([], [])


# ---------------------------------------------------------------------------------------- the web app
def _test_client():
    import warnings

    with warnings.catch_warnings():  # starlette 1.x prefers httpx2 for its TestClient; httpx works
        warnings.simplefilter("ignore", UserWarning)
        from starlette.testclient import TestClient
    return TestClient


@pytest.fixture
def client(review):
    pytest.importorskip("httpx")
    TestClient = _test_client()

    from fieldreid.review.app import create_app

    out, g, src = review
    app = create_app(out, g.path, token="t" * 20, who="tester")
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        yield c, app
    app.state.review.close()


def _signed_in(c, app):
    r = c.get("/?token=" + app.state.review.token, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    return c


def test_the_app_needs_the_token_then_a_csrf_token_for_every_change(client):
    c, app = client
    assert c.get("/api/queue").status_code == 401
    assert c.get("/?token=wrong-token-wrong-token").status_code == 403
    _signed_in(c, app)
    page = c.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in re.sub(r"https?://www\.w3\.org", "", page.text.split("<body>")[0])  # nothing from elsewhere
    csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page.text).group(1)
    items = c.get("/api/queue").json()["items"]
    key = items[0]["key"]
    body = {"verdict": "not_animal"}
    assert c.post(f"/api/item/{key}/decide", json=body).status_code == 403                 # no CSRF token
    assert c.post(f"/api/item/{key}/decide", json=body, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    evil = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
    assert c.post(f"/api/item/{key}/decide", json=body, headers=evil).status_code == 403    # another origin
    assert c.post(f"/api/item/{key}/decide", content="verdict=not_animal",
                  headers={"X-CSRF-Token": csrf, "Content-Type": "application/x-www-form-urlencoded"}).status_code == 415
    assert c.get("/api/queue", headers={"Host": "rebound.example:8765"}).status_code == 421  # DNS rebinding
    assert actions.history(app.state.review.gallery) == []
    ok = c.post(f"/api/item/{key}/decide", json={**body, "who": "ann"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200 and ok.json()["review"]["who"] == "ann"
    again = c.post(f"/api/item/{key}/decide", json=body, headers={"X-CSRF-Token": csrf})
    assert again.status_code == 409 and "undo that decision first" in again.json()["error"]
    undone = c.post("/api/undo", json={"who": "ann"}, headers={"X-CSRF-Token": csrf})
    assert undone.status_code == 200 and undone.json()["review"]["undone_by"] == "ann"


def test_pictures_are_named_by_ids_and_no_request_path_reaches_the_disk(client, review, tmp_path):
    c, app = client
    _signed_in(c, app)
    item = c.get("/api/item/" + c.get("/api/queue").json()["items"][0]["key"]).json()
    frame = item["frames"][0]
    for url in (frame["frame"], frame["crop"], frame["thumb"], item["candidates"][0]["photos"][0]["src"]):
        r = c.get("/" + url)
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8", url
    import importlib.util

    photo = item["candidates"][0]["photos"][0]
    if importlib.util.find_spec("fieldreid.verify") is not None:  # the local-feature stage draws its matches
        r = c.get(f"/img/matches/{frame['sha']}/{frame['idx']}/{photo['kind']}/{photo['id']}")
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    assert c.get(f"/img/matches/{frame['sha']}/{frame['idx']}/file/{photo['id']}").status_code == 404
    for bad in ("/img/frame/..%2F..%2Fetc%2Fpasswd", "/img/frame/%2Fetc%2Fpasswd", "/img/frame/" + "0" * 64,
                "/static/..%2Fapp.py", "/static/index.html", "/img/embedding/999999", "/img/sighting/-1",
                "/api/item/..%2F..", "/api/item/1-999"):
        assert c.get(bad).status_code in (404, 405), bad
    # a camera file replaced after processing is not shown as if it were the picture reviewed
    out, g, src = review
    root = app.state.review.source.root
    assert root is not None
    copy = tmp_path / "cards"
    import shutil

    shutil.copytree(root, copy)
    app.state.review.source.root = copy
    app.state.review.pictures._cache.clear()
    name = Path(frame["file"])
    (copy / name).write_bytes((copy / "southwest" / "2021-07-24_SYFR0655_coyote.JPG").read_bytes()
                              if name.name != "2021-07-24_SYFR0655_coyote.JPG" else b"")
    r = c.get("/" + frame["frame"])
    assert r.status_code == 404 and "changed since it was processed" in r.json()["error"]


def test_review_refuses_a_network_address_without_a_token(base, tmp_path):
    out, gpath = fresh_copy(base, tmp_path)
    r = fieldreid("review", out, "--gallery", gpath, "--host", "0.0.0.0", "--no-browser", check=False,
                  env={"FIELDREID_REVIEW_TOKEN": ""})
    assert r.returncode == 2 and "puts the review page on the network" in r.stderr
    r = fieldreid("review", out, "--host", "0.0.0.0", "--token", "short", "--no-browser", check=False)
    assert r.returncode == 2 and "at least 16 characters" in r.stderr


def test_the_lab_server_mounts_the_same_app_at_review(review, tmp_path):
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("httpx")
    TestClient = _test_client()

    from fieldreid.review.app import create_app
    from fieldreid.server.app import create_app as lab_app
    from fieldreid.server.db import LabDB

    out, g, src = review
    secret = "s" * 24
    lab = LabDB(None, tmp_path / "lab")
    app = lab_app(lab, review=create_app(out, g.path, token=secret, who="curator", loopback_only=False))
    with TestClient(app, base_url="http://lab.example.org") as c:
        assert c.get("/review/api/queue").status_code == 401
        r = c.get(f"/review/?token={secret}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/review/"
        assert "Path=/review/" in r.headers["set-cookie"]
        page = c.get("/review/")
        assert page.status_code == 200 and 'src="static/review.js"' in page.text  # relative: works under /review/
        assert c.get("/review/static/review.js").status_code == 200
        assert c.get("/review/api/queue").json()["items"]
        assert c.get("/v1/me").status_code == 401  # the device API is untouched and the cookie is no token for it
    lab.close()


def test_gallery_calls_inside_a_transaction_join_it_and_roll_back_together(tmp_path):
    g = Gallery(tmp_path / "g.db", who="tester")
    vec = np.eye(4, dtype=np.float32)
    g.add_embeddings(["a", "b"], vec[:2], "m", ["a.jpg", "b.jpg"], species="zebra")
    sid = g.add_sightings([{"image": "c.jpg", "box": None, "decision": "uncertain", "identity_id": "a", "upper": 0.9,
                            "lower": 0.8, "threshold_method": "t", "model_id": "m", "gallery_version": 1}])[0]
    version, n_changes = g.version, len(g.log())
    with pytest.raises(RuntimeError):
        with g.transaction("outer", {}):
            g.merge(["b"], "a")
            g.assign_sightings([sid], "a")
            g.add_embeddings(["a"], vec[2:3], "m", ["d.jpg"])
            raise RuntimeError("the last step fails")
    assert g.has_identity("b") and g.get_identity("a").n_embeddings == 1 and g.version == version
    assert len(g.log()) == n_changes
    with g.transaction("outer", {"what": "both"}):
        g.merge(["b"], "a")
        assert g.assign_sightings([sid], None) == 1
    assert not g.has_identity("b") and g.read("SELECT identity_id FROM sightings").fetchone()[0] is None
    actions_logged = [c.action for c in g.log(limit=3)]
    assert actions_logged == ["outer", "assign", "merge"]
    assert g.log(limit=2)[1].details["replaced"] == {str(sid): "a"}
    assert g.assign_sightings([sid], None) == 0 and len(g.log()) == n_changes + 3  # nothing changed: not logged
    with pytest.raises(Exception, match="No sighting"):
        g.assign_sightings([sid + 99], "a")
    g.close()
