"""A self-contained HTML review page: every new or uncertain animal beside its best gallery matches.

Everything is inlined (base64 JPEG thumbnails, CSS), so the page can be mailed or opened offline. An
animal's crop is the thumbnail ``watch`` stored for the track's representative detection; a match's
picture is, in order: a thumbnail of a sighting of that identity from this results database, a crop of
the gallery embedding's source image when that file is reachable, else a placeholder with the id.
"""

from __future__ import annotations

import base64
import html
import json
import sqlite3
from pathlib import Path

from fieldreid.report.tables import atomic_text, decision_probability
from fieldreid.watch.state import StateDB

THUMB = 96
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}.animal{display:flex;gap:14px;align-items:flex-start;
margin:12px 0;padding:10px;border:1px solid #ccc;border-radius:6px}.fig{text-align:center;font-size:12px;width:110px}
.fig img,.ph{width:96px;height:96px;object-fit:contain;background:#eee;display:block;margin:auto}
.ph{line-height:96px;color:#888}.new{border-left:6px solid #2a7}.uncertain{border-left:6px solid #e90}
.meta{font-size:13px;min-width:260px}h2{margin-top:1.4em}"""


def _img(blob: bytes | None, alt: str) -> str:
    if not blob:
        return f'<div class="ph">{html.escape(alt[:14])}</div>'
    return f'<img alt="{html.escape(alt)}" src="data:image/jpeg;base64,{base64.b64encode(blob).decode()}">'


def _thumb_from_file(path: Path, box: str) -> bytes | None:
    from fieldreid.crop import crops, whole_box
    from fieldreid.frames.decode import encode_jpeg, read_image

    try:
        frame = read_image(path, min_side=THUMB * 2, keep_data=True)
        b = tuple(float(v) for v in box.split(",")) if box else whole_box(frame.size)
        [img] = crops(frame, [b], THUMB)  # the crop the embedding was made from (fieldreid.crop), picture-sized
        return encode_jpeg(img, THUMB, quality=80)
    except Exception:  # a missing or unreadable source only costs the picture
        return None


class _Matches:
    """Thumbnails of gallery identities, cached."""

    def __init__(self, con: sqlite3.Connection, gallery: Path | None) -> None:
        self.con = con
        self.gallery = None
        self.gallery_dir = gallery.parent if gallery else Path(".")
        if gallery is not None and gallery.exists():
            try:
                self.gallery = sqlite3.connect(f"{gallery.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
            except sqlite3.Error:
                self.gallery = None
        self.cache: dict[str, bytes | None] = {}

    def thumb(self, identity: str) -> bytes | None:
        if identity in self.cache:
            return self.cache[identity]
        row = self.con.execute(
            "SELECT d.thumb FROM decisions c JOIN detections d ON d.sha256 = c.sha256 AND d.idx = c.idx WHERE "
            "c.identity = ? AND d.thumb IS NOT NULL ORDER BY c.decision = 'new' DESC, c.representative DESC, "
            "c.score DESC LIMIT 1", (identity,)).fetchone()
        blob = row[0] if row else None
        if blob is None and self.gallery is not None:
            try:
                for source, box in self.gallery.execute(
                        "SELECT source, box FROM embeddings WHERE identity_id = ? ORDER BY id LIMIT 3", (identity,)):
                    for cand in (Path(source), self.gallery_dir / source):
                        if cand.is_file():
                            blob = _thumb_from_file(cand, box)
                            break
                    if blob:
                        break
            except sqlite3.Error:
                pass
        self.cache[identity] = blob
        return blob


def write_html(out: Path, path: Path, title: str | None = None, max_animals: int = 200,
               gallery: Path | None = None) -> Path:
    """Write the review page for watch output folder ``out`` to ``path`` (atomically). Identities are shown as
    the gallery (``gallery``, default the one watch used) holds them now: merged, renamed, confirmed."""
    from fieldreid.gallery.store import box_key
    from fieldreid.report.identities import IdentityResolver, review_view

    db = StateDB(Path(out) / "results.db", readonly=True)
    try:
        con = db.con
        gallery = str(gallery) if gallery else db.meta("gallery")
        resolver = IdentityResolver(gallery)
        matches = _Matches(con, Path(gallery) if gallery else None)
        counts = db.counts()
        dec = db.decision_counts()
        title = title or f"fieldreid watch: {Path(db.meta('root') or out).name}"
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                 f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
                 "<table><tr><th>files done</th><th>failed</th><th>duplicates</th><th>pending</th><th>animals known</th>"
                 "<th>new</th><th>uncertain</th></tr>"
                 f"<tr><td>{counts['done']}</td><td>{counts['failed']}</td><td>{counts['duplicate']}</td>"
                 f"<td>{counts['pending']}</td><td>{dec['known']}</td><td>{dec['new']}</td><td>{dec['uncertain']}</td>"
                 "</tr></table>",
                 f"<p>Embedder <code>{html.escape(db.meta('embedder') or '?')}</code>, detector "
                 f"<code>{html.escape(db.meta('detector') or '?')}</code>, gallery <code>{html.escape(gallery or '?')}"
                 "</code>. One entry per animal (a track of an event), decided once from all its frames.</p>",
                 "<h2>New and uncertain animals</h2>"]
        rows = con.execute(
            "SELECT c.decision, c.identity, c.score, c.top, c.n_frames, c.calibrated, c.event_id, i.path, i.camera, "
            f"i.captured, d.thumb, d.conf, {decision_probability(con)}, c.sha256, d.x1, d.y1, d.x2, d.y2 "
            "FROM decisions c JOIN images i ON i.sha256 = c.sha256 JOIN detections d ON "
            "d.sha256 = c.sha256 AND d.idx = c.idx WHERE c.representative = 1 AND c.decision IN ('new', 'uncertain') "
            "ORDER BY c.decision DESC, i.captured LIMIT ?", (int(max_animals),)).fetchall()
        if not rows:
            parts.append("<p>None: every animal seen was matched with confidence.</p>")
        view = review_view(gallery, {(r[13], box_key(r[14:18])) for r in rows})
        for (decision, identity, score, top, n_frames, calibrated, event, file, camera, captured, thumb, conf, prob,
             sha, *box) in rows:
            res = resolver.resolve(identity, sha, box_key(box))
            standing = view.get((sha, box_key(box)))
            identity = res.identity if identity else None
            figs = [f'<div class="fig">{_img(thumb, file)}<b>this animal</b></div>']
            for ident, s in json.loads(top or "[]")[:4]:
                ident = resolver.resolve(ident).identity or ident
                if decision == "new" and ident == identity:
                    continue
                figs.append(f'<div class="fig">{_img(matches.thumb(ident), ident)}{html.escape(ident)}<br>'
                            f"score {s:.3f}</div>")
            label = identity or "—"
            if getattr(standing, "verdict", None):
                identity = standing.identity
                label = f"{identity or '—'} (reviewed by {standing.who}: {standing.verdict})"
            elif res.human_by:
                label += f" (confirmed by {res.human_by})"
            note = "" if calibrated else " (uncalibrated thresholds)"
            parts.append(
                f'<div class="animal {decision}"><div class="meta"><b>{decision.upper()}</b>{note}<br>'
                f"identity: <code>{html.escape(label)}</code><br>score: "
                f"{'—' if score is None else f'{score:.3f}'}<br>probability "
                f"{'of a new animal' if decision == 'new' else 'of the best candidate'}: "
                f"{'— (not calibrated)' if prob is None else f'{prob:.3f}'}<br>camera {html.escape(camera)}, event {event}, "
                f"{n_frames} frame(s)<br>{html.escape(captured)}<br><small>{html.escape(file)} (det {conf:.2f})"
                f"</small></div>{''.join(figs)}</div>")
        failed = con.execute("SELECT path, reason FROM files WHERE status = 'failed' ORDER BY path LIMIT 500").fetchall()
        if failed:
            parts.append("<h2>Files that could not be processed</h2><table><tr><th>file</th><th>reason</th></tr>")
            parts += [f"<tr><td>{html.escape(p)}</td><td>{html.escape(r or '')}</td></tr>" for p, r in failed]
            parts.append("</table>")
        parts.append("</body></html>\n")
        with atomic_text(path) as fh:
            fh.write("\n".join(parts))
        return Path(path)
    finally:
        db.close()
