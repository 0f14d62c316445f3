"""`fieldreid review` in a real browser: headless Chromium (Debian's) driven by Playwright, keys only.

One person reviews a real watch run (tests/review_support.py) from the first animal to the last: not this
species, not an animal, confirm a match, merge two identities and undo it, name a new individual and say a
later photo is that individual. Then the gallery, `fieldreid report` and the sync outbox must say the same.
Screenshots go to the test's temp folder (and to $FIELDREID_REVIEW_SCREENSHOT, e.g. docs/review.png, if set).
"""

from __future__ import annotations

import csv
import os
import queue
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from review_support import ROOT, built, fieldreid, fresh_copy

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright "
                                                            "(it drives the system Chromium; no browser download)")
CHROMIUM = os.environ.get("FIELDREID_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("headless Chromium not found: apt-get install chromium (or set $FIELDREID_CHROMIUM)",
                allow_module_level=True)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory, zebra, camtrap, yolov5n_onnx, default_embedder_onnx) -> Path:
    return built(tmp_path_factory, zebra, camtrap, yolov5n_onnx, default_embedder_onnx)


@pytest.fixture
def server(base, tmp_path):
    """`fieldreid review OUT --no-browser --port 0` in its own process; yields (url, out, gallery)."""
    out, gallery = fresh_copy(base, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "fieldreid.cli", "review", str(out), "--no-browser", "--port", "0",
                             "--who", "tester", "--qc", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        url = lines.get(timeout=60).strip()
    except queue.Empty:
        url = ""
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"fieldreid review printed no link: {url!r} {proc.stderr.read()[-2000:]}")
    yield url, out, gallery
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1440, "height": 900})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors
        yield pg
        browser.close()


def _file(page) -> str:
    return Path(page.locator("#frame-cap").inner_text().split(" · ")[0]).name


def _settle(page) -> None:
    """The track shown has its pictures, frame and crop (the page announces a decision only once the next track is shown)."""
    page.wait_for_function("() => ['crop', 'frame'].every((id) => { const i = document.getElementById(id); "
                           "return i.complete && i.naturalWidth > 0 })")


def _saved(page, text: str) -> None:
    sync_api.expect(page.locator("#toast")).to_contain_text(text)
    _settle(page)


def test_a_person_reviews_a_watch_run_with_the_keyboard(server, page, tmp_path):
    url, out, gallery = server
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    _settle(page)
    assert page.url.endswith("/") and "token" not in page.url  # the token left the address bar
    keys = page.locator("footer").inner_text()
    for hint in ("same as candidate", "merge identities", "new individual", "not this species", "not an animal",
                 "skip", "undo", "zoom"):
        assert hint in keys
    # new animals first: the bobcat the zebra gallery called a new zebra
    assert _file(page) == "IMAG0046_bobcat.JPG"
    sync_api.expect(page.locator("#summary")).to_contain_text("new animal")
    box = page.locator("#box").bounding_box()
    frame = page.locator("#frame").bounding_box()
    assert box and frame and 0 < box["width"] < frame["width"] and box["x"] >= frame["x"] - 1
    crop = page.evaluate("() => [document.getElementById('crop').naturalWidth, document.getElementById('crop').naturalHeight]")
    assert min(crop) > 100  # the crop at full resolution, not a thumbnail
    cands = page.locator("#candidates > li")
    assert cands.count() >= 3
    # up to 4 photos per candidate: the enrolled zebras have 4 (the best match may be a provisional one with fewer)
    assert max(c.locator(".photo img").count() for c in cands.all()) == 4 and "cos 0." in cands.first.inner_text()
    page.keyboard.press("+")
    assert page.locator("#zoom-level").inner_text().endswith("%")
    page.screenshot(path=tmp_path / "01-new-bobcat.png")
    cands.first.locator(".photo").first.click()  # compare side by side
    sync_api.expect(page.locator("#compare")).to_be_visible()
    page.wait_for_function("() => document.getElementById('cmp-b').naturalWidth > 0")
    page.screenshot(path=tmp_path / "02-compare.png")
    page.keyboard.press("Escape")

    page.keyboard.press("o")
    page.keyboard.type("bobcat")
    page.keyboard.press("Enter")
    _saved(page, "not this species (bobcat)")
    assert _file(page) == "2021-07-24_SYFR0655_coyote.JPG"
    page.keyboard.press("x")
    _saved(page, "not an animal")
    # then the uncertain ones, by camera and time
    assert _file(page) == "z10_left_img-0000125.jpg"
    assert page.locator("#candidates > li").first.get_attribute("data-id") == "z10"
    page.keyboard.press("1")
    _saved(page, "same as z10")
    assert _file(page) == "z22_left_img-0000408.jpg"
    second = page.locator("#candidates > li").nth(1).get_attribute("data-id")
    page.keyboard.press("Shift+Digit2")
    _saved(page, f"z22 merged into {second}")
    with sqlite3.connect(gallery) as con:
        assert con.execute("SELECT count(*) FROM identities WHERE id = 'z22'").fetchone()[0] == 0
    page.keyboard.press("u")
    _saved(page, "Undone")
    assert _file(page) == "z22_left_img-0000408.jpg"
    page.keyboard.press("1")
    _saved(page, "same as z22")
    # a zebra the gallery has never seen: a new individual, named
    assert _file(page) == "z41_left_img-0000743.jpg"
    shot = os.environ.get("FIELDREID_REVIEW_SCREENSHOT")
    if shot:
        _docs_png(page, Path(shot))
    page.keyboard.press("n")
    sync_api.expect(page.locator("#new-name")).to_be_focused()
    page.keyboard.type("Stripy")
    page.screenshot(path=tmp_path / "03-new-individual.png")
    page.keyboard.press("Enter")
    _saved(page, "new individual Stripy")
    # its second photo: the new individual is among the candidates now
    assert _file(page) == "z41_left_img-0000753.jpg"
    ids = page.locator("#candidates > li").evaluate_all("els => els.map(e => [e.dataset.id, e.innerText])")
    rank = next(i for i, (_, text) in enumerate(ids) if "Stripy" in text)
    stripy = ids[rank][0]
    page.screenshot(path=tmp_path / "04-second-photo.png")
    page.keyboard.press(str(rank + 1))
    _saved(page, f"same as {stripy}")
    sync_api.expect(page.locator("#empty")).to_contain_text("Nothing left to review")
    assert page.errors == []

    # ---- the gallery says what the person said
    con = sqlite3.connect(f"file:{gallery}?mode=ro", uri=True)
    ident = {r[0]: r[1:] for r in con.execute("SELECT id, name, status FROM identities")}
    assert ident[stripy] == ("Stripy", "confirmed") and "z22" in ident
    assert not any(i.startswith("plains_zebra-P") and i != stripy for i in ident)  # the bobcat/coyote zebras are gone
    got = dict(con.execute("SELECT s.image, s.identity_id FROM sightings s JOIN review_sightings r ON "
                           "r.sighting_id = s.id"))
    assert got == {"southwest/IMAG0046_bobcat.JPG": None, "southwest/2021-07-24_SYFR0655_coyote.JPG": None,
                   "zebra-cam/z10_left_img-0000125.jpg": "z10", "zebra-cam/z22_left_img-0000408.jpg": "z22",
                   "zebra-cam/z41_left_img-0000743.jpg": stripy, "zebra-cam/z41_left_img-0000753.jpg": stripy}
    log = con.execute("SELECT verdict, who, undone_at IS NOT NULL FROM review_log ORDER BY id").fetchall()
    assert [v for v, _, _ in log] == ["other_species", "not_animal", "same", "same", "same", "new", "same"]
    assert {w for _, w, _ in log} == {"tester"} and [u for *_, u in log] == [0, 0, 0, 1, 0, 0, 0]
    actions = [r[0] for r in con.execute("SELECT action FROM changes WHERE action LIKE 'review%'")]
    assert actions.count("review") == 7 and actions.count("review-undo") == 1
    # ---- queued for sync, crops and vectors taken
    queued = con.execute("SELECT count(*), count(crop), count(vector) FROM sync_outbox").fetchone()
    assert queued == (6, 6, 6)
    con.close()
    # ---- and exported by fieldreid report
    fieldreid("report", out, "--camtrap-dp", tmp_path / "pkg")
    media = {r["mediaID"]: r["fileName"] for r in csv.DictReader((tmp_path / "pkg" / "media.csv").open())}
    obs = {media[r["mediaID"]]: r for r in csv.DictReader((tmp_path / "pkg" / "observations.csv").open())
           if r["observationLevel"] == "media"}
    for name in ("z41_left_img-0000743.jpg", "z41_left_img-0000753.jpg"):
        assert (obs[name]["individualID"], obs[name]["classificationMethod"], obs[name]["classifiedBy"]) == (
            stripy, "human", "tester")
    assert obs["IMAG0046_bobcat.JPG"]["individualID"] == "" and obs["IMAG0046_bobcat.JPG"]["classificationMethod"] == "human"
    assert obs["z13_left_img-0000207.jpg"]["classificationMethod"] == "machine"  # not reviewed


def _docs_png(page, path: Path) -> None:
    """The README's screenshot: this page, a small PNG (256 colours)."""
    from PIL import Image

    raw = path.with_suffix(".raw.png")
    page.screenshot(path=raw)
    with Image.open(raw) as im:
        im = im.convert("RGB")
        im = im.resize((1200, round(im.height * 1200 / im.width)), Image.Resampling.LANCZOS)
        im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    raw.unlink()
