"""Gallery commands: ``enroll``, ``identify``, ``eval``, ``calibrate`` and ``gallery list|show|...``.

``fieldreid.cli`` calls :func:`register` to add them to the main app. Library errors print as one line
and exit with status 2, as in the rest of the CLI.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from fieldreid.cli.common import BackendOpt, CropsOpt, DetectorOpt, EmbedderOpt, err, out
from fieldreid.cli.common import friendly as _friendly
from fieldreid.cli.common import open_crop_detector as _open_crop_detector
from fieldreid.cli.common import open_detector as _open_detector
from fieldreid.cli.common import open_embedder as _open_embedder
from fieldreid.cli.common import progress_bar as _progress
from fieldreid.errors import FieldreidError, InputError
from fieldreid.types import DecisionKind
from fieldreid.verify.features import MAX_KEYPOINTS
from fieldreid.verify.fuse import VERIFY_K

GalleryOpt = Annotated[Path, typer.Option("--gallery", "-g", help="Gallery file (SQLite).")]
ConfOpt = Annotated[float, typer.Option(help="Detector confidence for animal boxes.")]
SplitOpt = Annotated[str | None, typer.Option(help="Use only metadata rows with this split value.")]
WhoOpt = Annotated[str | None, typer.Option(help="Name recorded in the change log (default: $FIELDREID_USER "
                                                 "or the login name).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the known/unknown identity split.")]
UnknownOpt = Annotated[float, typer.Option(help="Fraction of identities held out as unknown animals.")]
EnrolOpt = Annotated[float, typer.Option(help="Fraction of each known identity's images enrolled.")]
EmbedBatchOpt = Annotated[int, typer.Option(help="Images per embedder batch.")]


def _print_failures(failures: list[tuple[str, str]], limit: int = 50) -> None:
    if not failures:
        return
    table = Table(title=f"{len(failures)} file(s) not used", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("reason", overflow="fold")
    for path, reason in failures[:limit]:
        table.add_row(path, reason)
    if len(failures) > limit:
        table.add_row("…", f"{len(failures) - limit} more")
    err.print(table)


def _embed_labelled(metadata: Path, split: str | None, crops: bool, embedder: Path | None,
                    detector: Path | None, backend: str, conf: float, batch: int, whole_frame_fallback: bool = False):
    from fieldreid.gallery.enroll import embed_items, read_metadata

    items = read_metadata(metadata, split)
    if not items:
        raise InputError(f"No labelled rows in {metadata}{f' (split {split})' if split else ''}.")
    emb = _open_embedder(embedder, backend)
    det = _open_crop_detector(detector, backend, conf) if crops else _open_detector(detector, backend, conf)
    with _progress(len(items), "embed") as progress:
        task = progress.add_task("embed", total=len(items))
        res = embed_items(items, emb, det, crops, batch, lambda n: progress.update(task, completed=n),
                          whole_frame_fallback=whole_frame_fallback, min_conf=conf)
    _print_failures(res.failures)
    if len(res.items) == 0:
        raise InputError(f"None of the {len(items)} images in {metadata} could be embedded.")
    return emb, res


# ------------------------------------------------------------------------------------------ commands
def enroll_cmd(
    source: Annotated[Path, typer.Argument(help="metadata.csv (image_id, identity, path, species, split) or a "
                                                "folder with one sub-folder per identity.")],
    gallery: GalleryOpt,
    split: SplitOpt = None,
    crops: CropsOpt = False,
    species: Annotated[str | None, typer.Option(help="Species for rows/folders that do not name one.")] = None,
    embedder: EmbedderOpt = None,
    detector: DetectorOpt = None,
    conf: ConfOpt = 0.2,
    batch: EmbedBatchOpt = 16,
    backend: BackendOpt = "auto",
    reembed: Annotated[bool, typer.Option("--reembed", help="First re-embed every gallery image with this "
                                                            "embedder (after a model change).")] = False,
    drop_missing: Annotated[bool, typer.Option(help="With --reembed: drop embeddings whose image is gone.")] = False,
    storage: Annotated[str, typer.Option(help="Vector storage of a new gallery: float32 | float16.")] = "float32",
    who: WhoOpt = None,
    features: Annotated[bool, typer.Option("--features/--no-features", help="Also store each crop's local "
                                                                           "features (verification).")] = True,
) -> None:
    """Enrol labelled animals into a gallery (idempotent: re-running adds only what is missing)."""
    from fieldreid.gallery.enroll import enroll, load_source
    from fieldreid.gallery.enroll import reembed as reembed_gallery
    from fieldreid.gallery.store import Gallery

    items = load_source(source, split, species)
    emb = _open_embedder(embedder, backend)
    det = _open_crop_detector(detector, backend, conf) if crops else _open_detector(detector, backend, conf)
    with Gallery(gallery, storage=storage, who=who) as g:
        n_re = 0
        if reembed and g.model_id is not None and g.model_id != emb.model_id:
            n = g.count_embeddings()
            with _progress(n, "re-embed") as progress:
                task = progress.add_task("re-embed", total=n)
                n_re, lost = reembed_gallery(g, emb, drop_missing, batch,
                                             lambda k: progress.update(task, completed=k))
            err.print(f"re-embedded {n_re} gallery images with {emb.model_id}; {len(lost)} dropped")
            _print_failures(lost)
        elif reembed:
            err.print(f"gallery already uses {emb.model_id}: nothing to re-embed")
        with _progress(len(items), "enroll") as progress:
            task = progress.add_task("enroll", total=len(items))
            report = enroll(items, g, emb, det, crops=crops, batch_size=batch,
                            on_progress=lambda k: progress.update(task, completed=k), features=features)
        total_ids = len(g.identities())
    _print_failures(report.failures)
    err.print(f"{report.added} embeddings added, {report.already_present} already present, "
              f"{len(report.failures)} failed; {report.identities_created} new identities "
              f"({total_ids} in {gallery}, model {report.model_id})")
    if report.whole_image:
        err.print(f"{report.whole_image} crop(s) embedded whole: the detector found no animal box in them")
    if features:
        err.print(f"local features stored for {report.features_indexed} gallery image(s) (verification)")


def identify_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Images or folders (walked recursively).")],
    gallery: GalleryOpt,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="decisions.csv or decisions.json")] = Path(
        "decisions.csv"),
    crops: CropsOpt = False,
    species: Annotated[str | None, typer.Option(help="Species of the animals (restricts the search; names "
                                                     "provisional identities).")] = None,
    k: Annotated[int, typer.Option(help="Candidates listed per crop.")] = 5,
    record: Annotated[bool, typer.Option(help="Record sightings in the gallery; --no-record is a dry run that "
                                              "writes nothing to it (no sightings, no provisional identities).")
                      ] = True,
    new_identities: Annotated[bool | None, typer.Option("--new-identities/--no-new-identities",
                                                        help="Create provisional identities for new animals "
                                                             "(default: yes, unless --no-record).")] = None,
    embedder: EmbedderOpt = None,
    detector: DetectorOpt = None,
    conf: ConfOpt = 0.2,
    batch: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    backend: BackendOpt = "auto",
) -> None:
    """Identify animals: known / new / uncertain per crop, with score, runner-up and top-k candidates."""
    from fieldreid.frames.files import iter_files
    from fieldreid.gallery.enroll import Item, embed_items, source_key
    from fieldreid.gallery.openset import Identifier
    from fieldreid.gallery.store import Gallery
    from fieldreid.storage.fsutil import atomic_write_json, atomic_write_text, path_text

    if out_path.suffix.lower() not in (".csv", ".json"):
        raise InputError(f"--out must end in .csv or .json, got {out_path.name}")
    if new_identities and not record:
        raise InputError("--no-record writes nothing to the gallery, but --new-identities would add provisional "
                         "identities to it: drop one of the two.")
    new_identities = record if new_identities is None else new_identities
    files = list(iter_files(paths))
    if not files:
        raise InputError(f"No images found under {', '.join(map(str, paths))}.")
    with Gallery(gallery, create=False) as g:
        emb = _open_embedder(embedder, backend)
        g.check_model(emb.model_id, emb.dim)
        ident = Identifier(g, species=species, create_provisional=new_identities, record=record, k=k,
                           model_thresholds=emb.thresholds)
        verify = _verification_pays(g, emb.model_id)
        decisions, failures = [], []
        with _progress(len(files), "identify") as progress:
            task = progress.add_task("identify", total=len(files))
            if crops:
                det = _open_crop_detector(detector, backend, conf)
                for a in range(0, len(files), 64):
                    chunk = [Item(f, None, species or "") for f in files[a:a + 64]]
                    res = embed_items(chunk, emb, det, True, batch, min_conf=conf)
                    failures.extend(res.failures)
                    if res.items:
                        decisions += ident.identify(res.vectors, emb.model_id,
                                                    sources=[source_key(it.path) for it in res.items],
                                                    boxes=res.boxes,
                                                    source_sha256=[_content_sha256(it.path) for it in res.items],
                                                    query_features=_query_features(
                                                        verify, [(it.path, b) for it, b in
                                                                 zip(res.items, res.boxes, strict=True)]))
                    progress.update(task, completed=a + len(chunk))
            else:
                from fieldreid.embed.pipeline import Pipeline

                pipe = Pipeline(_open_detector(detector, backend, conf), emb, batch_size=batch, min_crop_conf=conf)
                for r in pipe.run(files):
                    progress.advance(task)
                    if r.failure:
                        failures.append((path_text(r.path), r.failure))
                        continue
                    if len(r.animal_index):
                        boxes = [r.detections.xyxy[i].tolist() for i in r.animal_index]
                        decisions += ident.identify(r.embeddings, emb.model_id,
                                                    sources=[source_key(r.path)] * len(boxes), boxes=boxes,
                                                    source_sha256=[_content_sha256(r.path)] * len(boxes),
                                                    query_features=_query_features(
                                                        verify, [(r.path, b) for b in boxes]))
        if out_path.suffix.lower() == ".json":
            from fieldreid.crop import CROP_RULE

            atomic_write_json(out_path, {"gallery": str(g.path), "model_id": emb.model_id, "crop_rule": CROP_RULE,
                                         "decisions": [_json_safe(d.to_dict()) for d in decisions],
                                         "failures": [{"file": f, "reason": r} for f, r in failures]})
        else:
            atomic_write_text(out_path, _decisions_csv(decisions, failures))
    counts = {c: sum(d.decision == c for d in decisions) for c in DecisionKind}
    err.print(f"{len(files)} files, {len(decisions)} animals: {counts['known']} known, {counts['new']} new, "
              f"{counts['uncertain']} uncertain; {len(failures)} failed → {out_path}")
    if decisions and not all(d.calibrated for d in decisions):
        err.print("[yellow]note:[/] thresholds are uncalibrated defaults "
                  f"(upper {decisions[0].upper}, lower {decisions[0].lower}); run `fieldreid calibrate` on "
                  "labelled images of your population.")
    elif any(d.threshold_source == "model" for d in decisions):
        d = next(d for d in decisions if d.threshold_source == "model")
        err.print(f"[yellow]note:[/] no thresholds calibrated for this population yet: using the embedder's own "
                  f"({escape(d.threshold_method)}: upper {d.upper:.3f}); `fieldreid calibrate` fits them to your "
                  "animals.",
                  highlight=False)
    _print_failures(failures)


def _verification_pays(g, model_id: str) -> bool:
    """Whether calibration stored a fusion that pays for some species of this model (then each crop's local
    features are computed for the Identifier to re-rank with)."""
    return any(json.loads(d).get("pays") for (d,) in g.read("SELECT data FROM fusion WHERE model_id = ?",
                                                             (model_id,)))


def _query_features(wanted: bool, crops: list) -> list | None:
    """Per (image path, box) crop, what extracts its local features by the one crop rule at the keypoint cap
    the Identifier asks for (the fusion's), or None where the crop is unreadable. The Identifier calls it
    only for a query it verifies."""
    if not wanted:
        return None
    from fieldreid.verify.features import features_of

    def lazy(path, box):
        def extract(max_keypoints: int):
            try:
                return features_of(path, box, max_keypoints)
            except FieldreidError:
                return None
        return extract

    return [lazy(path, box) for path, box in crops]


def _content_sha256(path: Path) -> str | None:
    """The file's content hash: a sighting of the same photo and box is recorded once (None if unreadable)."""
    from fieldreid.engines.manifest import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


#: ``score``: what the thresholds compare (cosine, or the fused probability where verification decided);
#: ``probability``: the decision's calibrated probability (empty without a calibration), appended last with
#: the fit that gave it, so readers by column name and by position both keep working
CSV_COLUMNS = ["file", "box", "decision", "identity", "score", "runner_up", "runner_up_score", "upper", "lower",
               "calibrated", "threshold_method", "threshold_source", "species", "model_id", "gallery_version", "top5",
               "sighting_id", "error", "probability", "probability_source"]


def _decisions_csv(decisions, failures) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    for d in decisions:
        w.writerow({"file": d.source, "box": " ".join(f"{v:.1f}" for v in d.box) if d.box else "",
                    "decision": d.decision, "identity": d.identity or "", "score": fmt(d.score),
                    "runner_up": d.runner_up or "", "runner_up_score": fmt(d.runner_up_score),
                    "upper": d.upper, "lower": d.lower, "calibrated": d.calibrated,
                    "threshold_method": d.threshold_method, "threshold_source": d.threshold_source,
                    "species": d.species, "model_id": d.model_id,
                    "gallery_version": d.gallery_version,
                    "top5": ";".join(f"{i}:{s:.4f}" for i, s in d.top[:5]), "sighting_id": d.sighting_id or "",
                    "error": "", "probability": fmt(d.probability), "probability_source": d.probability_source or ""})
    for f, reason in failures:
        w.writerow({"file": f, "error": reason})
    return buf.getvalue()


def eval_cmd(
    metadata: Annotated[Path, typer.Argument(help="metadata.csv with identity labels.")],
    split: SplitOpt = None,
    crops: CropsOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the JSON here.")] = None,
    lower: Annotated[float | None, typer.Option(help="Open-set lower threshold (default: the embedder's own "
                                                     "thresholds, else the uncalibrated defaults).")] = None,
    upper: Annotated[float | None, typer.Option(help="Open-set upper threshold (default: the embedder's own "
                                                     "thresholds, else the uncalibrated defaults).")] = None,
    seed: SeedOpt = 0,
    unknown_fraction: UnknownOpt = 0.3,
    enrol_fraction: EnrolOpt = 0.5,
    embedder: EmbedderOpt = None,
    detector: DetectorOpt = None,
    conf: ConfOpt = 0.2,
    batch: EmbedBatchOpt = 16,
    backend: BackendOpt = "auto",
    verify: Annotated[bool, typer.Option("--verify", help="Also measure local-feature verification: each "
                                                          "query's top-K re-scored by the fused probability "
                                                          "(cosine + RANSAC inliers); top-1 and open-set GM "
                                                          "before/after, ms per query.")] = False,
    verify_k: Annotated[list[int] | None, typer.Option("--verify-k", help="K candidates re-scored (repeatable; "
                                                                          f"default {VERIFY_K} and "
                                                                          f"{VERIFY_K // 2}).")] = None,
    verify_fit_split: Annotated[str | None, typer.Option(help="With --verify: fit the fusion and its threshold "
                                                              "on the rows of this split (other animals); "
                                                              "default: two identity folds cross-fit.")] = None,
    keypoints: Annotated[int, typer.Option(help="With --verify: keypoint cap per crop.")] = MAX_KEYPOINTS,
) -> None:
    """Evaluate an embedder: one-vs-all top-1/5/10 + mAP (MiewID) and open-set BAKS/BAUS (AnimalCLEF)."""
    from fieldreid.evaluation.metrics import evaluate
    from fieldreid.gallery.openset import Thresholds
    from fieldreid.storage.fsutil import atomic_write_json

    if verify and verify_k and min(verify_k) < 1:
        raise InputError(f"--verify-k must be at least 1, got {min(verify_k)}.")
    if verify and verify_fit_split is not None and verify_fit_split == split:
        raise InputError(f"--verify-fit-split {verify_fit_split} is the evaluated split; fit on other animals.")
    emb, res = _embed_labelled(metadata, split, crops, embedder, detector, backend, conf, batch,
                               whole_frame_fallback=True)
    th = emb.thresholds or Thresholds()  # what decisions use before a gallery is calibrated
    source = {"model": f"the model's ({th.method})", "default": "uncalibrated defaults"}[th.source]
    if lower is not None or upper is not None:
        source = "given"
    lo = lower if lower is not None else (upper if upper is not None else th.lower)
    up = upper if upper is not None else (lower if lower is not None else th.upper)
    from fieldreid.crop import CROP_RULE

    labels = [it.identity for it in res.items]
    # what the metrics cover: every labelled image that could be read; one without an animal box is
    # evaluated on the whole image (the crop rule's fallback), never dropped
    result = {"metadata": str(metadata), "split": split, "model_id": emb.model_id, "crop_rule": CROP_RULE,
              "n_images_labelled": len(res.items) + len(res.failures), "n_images_evaluated": len(res.items),
              "n_images_whole_image": res.n_whole_image, "n_images_failed":
              len(res.failures), "thresholds_source": source, **evaluate(res.vectors, labels, lower=lo, upper=up, seed=seed,
                                           unknown_fraction=unknown_fraction, enrol_fraction=enrol_fraction)}
    if verify:
        result["verify"] = _verify_eval(res, labels, metadata, split, verify_fit_split, crops, embedder, detector,
                                        backend, conf, batch, verify_k or [VERIFY_K, VERIFY_K // 2], keypoints, seed,
                                        unknown_fraction, enrol_fraction)
    if out_path is not None:
        atomic_write_json(out_path, result)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    ova, osr = result["one_vs_all"], result["open_set"]
    t = Table(title=f"{metadata}{f' [{split}]' if split else ''} — {emb.model_id}", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("images / identities", f"{ova['n_images']} / {ova['n_identities']}")
    t.add_row("images evaluated of labelled (whole image: no animal box / unreadable)",
              f"{result['n_images_evaluated']} of {result['n_images_labelled']} ({result['n_images_whole_image']} / "
              f"{result['n_images_failed']})")
    t.add_row("one-vs-all queries (single-image ids left out)", f"{ova['n_queries']} ({ova['n_excluded_single_image']})")
    for key in ("top1", "top5", "top10", "mAP"):
        t.add_row(f"one-vs-all {key}", f"{ova[key]:.3f}")
    t.add_row("open set: gallery / known q / unknown q",
              f"{osr['n_gallery_images']} / {osr['n_known_queries']} / {osr['n_unknown_queries']}")
    t.add_row("thresholds used by decisions", escape(result["thresholds_source"]))
    for name, m in (("at thresholds", osr.get("at_thresholds")), ("best single threshold", osr["best"])):
        if m:
            t.add_row(f"{name} (lower {m['lower']:.3f}, upper {m['upper']:.3f})",
                      f"BAKS {m['BAKS']:.3f}  BAUS {m['BAUS']:.3f}  GM {m['geometric_mean']:.3f}")
    for k, v in (result.get("verify") or {}).get("per_k", {}).items():
        g, f = v["open_set"]["global"], v["open_set"]["fused"]
        t.add_row(f"verify K={k}: top-1 before → after (true animal in top-K)",
                  f"{v['top1_before']:.3f} → {v['top1_after']:.3f} ({v['true_identity_in_top_k']:.3f})")
        t.add_row(f"verify K={k}: open-set GM at calibrated threshold, global → fused",
                  f"{g['GM_at_calibrated']:.3f} → {f['GM_at_calibrated']:.3f}")
        t.add_row(f"verify K={k}: pays / ms per query", f"{'yes' if v['pays'] else 'no'} / {v['ms_per_query']:.0f}")
    if result.get("verify"):
        t.add_row("verify: features ms per image", f"{result['verify']['features_ms_per_image']:.1f}")
    out.print(t)


def _verify_eval(res, labels, metadata, split, fit_split, crops, embedder, detector, backend, conf, batch, ks,
                 keypoints, seed, unknown_fraction, enrol_fraction) -> dict:
    """``eval --verify``: local features of every evaluated crop (same boxes), then
    :func:`fieldreid.evaluation.rerank.verify_eval`."""
    import time

    from fieldreid.evaluation.rerank import verify_eval
    from fieldreid.verify.features import features_of, kind_for

    items, vectors, boxes, fit_mask = list(res.items), res.vectors, list(res.boxes), None
    if fit_split is not None:
        _, fit = _embed_labelled(metadata, fit_split, crops, embedder, detector, backend, conf, batch,
                                 whole_frame_fallback=True)
        items += fit.items
        vectors = np.concatenate([vectors, fit.vectors])
        boxes += fit.boxes
        labels = list(labels) + [it.identity for it in fit.items]
        fit_mask = np.r_[np.zeros(len(res.items), bool), np.ones(len(fit.items), bool)]
    feats, keep, failures = [], [], []
    t0 = time.perf_counter()
    with _progress(len(items), "features") as progress:
        task = progress.add_task("features", total=len(items))
        for i, (it, box) in enumerate(zip(items, boxes, strict=True)):
            try:
                feats.append(features_of(it.path, box, keypoints))
                keep.append(i)
            except FieldreidError as exc:
                failures.append((str(it.path), str(exc)))
            progress.advance(task)
    ms_feat = 1e3 * (time.perf_counter() - t0) / max(1, len(items))
    _print_failures(failures)
    keep_arr = np.asarray(keep, np.int64)
    out_v = verify_eval(vectors[keep_arr], np.asarray(labels, dtype=object)[keep_arr], feats, ks=ks,
                        fit_mask=None if fit_mask is None else fit_mask[keep_arr], seed=seed,
                        unknown_fraction=unknown_fraction, enrol_fraction=enrol_fraction)
    return {"features": kind_for(keypoints), "keypoints": keypoints, "fit_split": fit_split,
            "features_ms_per_image": ms_feat, "n_feature_failures": len(failures), **out_v}


def calibrate_cmd(
    metadata: Annotated[Path, typer.Argument(help="metadata.csv with identity labels of your population.")],
    gallery: Annotated[Path | None, typer.Option("--gallery", "-g", help="Gallery file to store the thresholds "
                                                                         "in, per species.")] = None,
    split: SplitOpt = None,
    crops: CropsOpt = False,
    into_model: Annotated[bool, typer.Option("--into-model", help="Instead of a gallery, write one pair of "
                                                                  "thresholds into the embedder ONNX's metadata: "
                                                                  "its defaults wherever no gallery is calibrated. "
                                                                  "Use identities it was not trained on.")] = False,
    target_far: Annotated[float | None, typer.Option(help="Highest acceptable rate of unknown animals called "
                                                          "known; scores between the thresholds become "
                                                          "'uncertain'. Default: maximise sqrt(BAKS·BAUS).")] = None,
    seed: SeedOpt = 0,
    repeats: Annotated[int, typer.Option(help="Open-set simulations pooled.")] = 5,
    unknown_fraction: UnknownOpt = 0.3,
    enrol_fraction: EnrolOpt = 0.5,
    embedder: EmbedderOpt = None,
    detector: DetectorOpt = None,
    conf: ConfOpt = 0.2,
    batch: EmbedBatchOpt = 16,
    backend: BackendOpt = "auto",
    who: WhoOpt = None,
    verify: Annotated[bool, typer.Option("--verify", help="Also fit, per species, the fusion of cosine and "
                                                          "local-feature inliers and decide whether "
                                                          "verification pays (held-out top-1 gain >= 0.01); "
                                                          "identify then re-ranks where it does.")] = False,
    verify_k: Annotated[int, typer.Option(help="With --verify: gallery images re-scored per query.")] = VERIFY_K,
) -> None:
    """Choose open-set thresholds per species from labelled images and store them in the gallery, with the
    calibrated probability that a decision is right (fitted in the same open-set simulations; with --verify,
    also the fusion of cosine and local-feature inliers)."""
    from fieldreid.evaluation.metrics import calibrate
    from fieldreid.gallery.store import Gallery

    if into_model:
        if gallery is not None:
            raise InputError("Give either --gallery (thresholds for a population) or --into-model, not both.")
        _calibrate_model(metadata, split, crops, embedder, detector, backend, conf, batch, seed, repeats)
        return
    if gallery is None:
        raise InputError("Missing option '--gallery': the gallery to store the thresholds in (or --into-model to "
                         "write them into the embedder).")
    with Gallery(gallery, create=False, who=who) as g:
        emb, res = _embed_labelled(metadata, split, crops, embedder, detector, backend, conf, batch)
        g.check_model(emb.model_id, emb.dim)
        species = np.array([it.species for it in res.items], dtype=object)
        labels = np.array([it.identity for it in res.items], dtype=object)
        t = Table(title=f"thresholds stored in {gallery} for {emb.model_id}", title_justify="left")
        for col in ("species", "lower", "upper", "BAKS", "BAUS", "GM", "unknown→known", "uncertain"):
            t.add_column(col)
        stored = 0
        feats = _features_for(res) if verify else None
        for sp in sorted(set(species)):
            mask = species == sp
            if len(set(labels[mask])) < 3:
                err.print(f"[yellow]skipped[/] {sp}: fewer than 3 identities to calibrate on")
                continue
            cal = calibrate(res.vectors[mask], labels[mask], target_far=target_far, unknown_fraction=unknown_fraction,
                            enrol_fraction=enrol_fraction, seed=seed, repeats=repeats, gallery=g, species=sp,
                            model_id=emb.model_id)
            stored += 1
            t.add_row(sp, f"{cal.lower:.4f}", f"{cal.upper:.4f}", f"{cal.BAKS:.3f}", f"{cal.BAUS:.3f}",
                      f"{cal.geometric_mean:.3f}", f"{cal.unknown_called_known_rate:.3f}", f"{cal.uncertain_rate:.3f}")
            cosine = _calibrate_probability(sp, res.vectors[mask], labels[mask], unknown_fraction, enrol_fraction,
                                            seed, repeats)
            if feats is not None:
                _calibrate_verification(g, emb.model_id, sp, res.vectors[mask], labels[mask],
                                        [f for f, m in zip(feats, mask, strict=True) if m], verify_k, cosine,
                                        seed=seed, repeats=repeats, unknown_fraction=unknown_fraction,
                                        enrol_fraction=enrol_fraction)
            elif cosine is not None:
                _store_cosine(g, emb.model_id, sp, cosine)
    if not stored:
        raise InputError("No species had enough identities (3 or more) to calibrate; nothing was stored.")
    out.print(t)


def _features_for(res) -> list:
    """Local features of each embedded item's crop (the same box), with a progress bar."""
    from fieldreid.verify.features import features_of

    feats = []
    with _progress(len(res.items), "features") as progress:
        task = progress.add_task("features", total=len(res.items))
        for it, box in zip(res.items, res.boxes, strict=True):
            feats.append(features_of(it.path, box))
            progress.advance(task)
    return feats


def _calibrate_probability(species: str, vectors, labels, unknown_fraction: float, enrol_fraction: float,
                           seed: int, repeats: int):
    """The cosine-only probability fit for one species (:func:`fieldreid.evaluation.rerank.calibrate_cosine`),
    or None (warned) where the simulations give nothing to fit (no best candidate right, or every one)."""
    from fieldreid.evaluation.rerank import calibrate_cosine

    try:
        fusion = calibrate_cosine(vectors, labels, unknown_fraction, enrol_fraction, seed, repeats)
    except InputError as exc:
        err.print(f"[yellow]no probability[/] for {species}: {exc}", highlight=False)
        return None
    e = fusion.evidence
    held = (f"; held out: mean probability {e['top1_predicted']:.3f}, right {e['top1_observed']:.3f}"
            if "top1_predicted" in e else "")
    err.print(f"{species}: match probability fitted on {fusion.n_pairs} open-set queries' best candidates{held}",
              highlight=False)
    return fusion


def _store_cosine(g, model_id: str, species: str, cosine) -> None:
    """Store the cosine-only fit; a fused fit stored by an earlier ``--verify`` stays (its fallback replaced),
    so calibrating thresholds again does not switch verification off."""
    from fieldreid.verify.fuse import Fusion

    stored = g.fusion(species, model_id)
    earlier = Fusion.from_dict(stored) if stored else None
    if earlier is not None and earlier.uses_inliers:
        err.print(f"{species}: the verification fusion of an earlier `calibrate --verify` is kept (run with "
                  "--verify to refit it)", highlight=False)
        g.set_fusion(species, model_id, replace(earlier, cosine_only=cosine).to_dict())
    else:
        g.set_fusion(species, model_id, cosine.to_dict())


def _calibrate_verification(g, model_id: str, species: str, vectors, labels, feats, k: int, cosine=None,
                            **simulation) -> None:
    """Fit and store the fusion of cosine and inliers (with ``cosine``, the cosine-only fit, inside it: the
    probability of crops that are not verified); ``simulation``: the open-set simulations' seed, repeats and
    fractions, as the cosine thresholds use them."""
    from fieldreid.evaluation.rerank import calibrate_fusion

    if k < 1:
        raise InputError(f"--verify-k must be at least 1, got {k}.")
    fusion, threshold = calibrate_fusion(vectors, labels, feats, k=k, **simulation)
    g.set_fusion(species, model_id, replace(fusion, cosine_only=cosine).to_dict())
    e = fusion.evidence
    err.print(f"{species}: verification {'pays' if fusion.pays else 'does not pay: off'} (held-out top-1 "
              f"{e['top1_without']:.3f} → {e['top1_with']:.3f}, open-set GM {e['gm_without']:.3f} → "
              f"{e['gm_with']:.3f}; fused threshold {threshold:.3f}, K={k})", highlight=False)


def _calibrate_model(metadata: Path, split: str | None, crops: bool, embedder: Path | None, detector: Path | None,
                     backend: str, conf: float, batch: int, seed: int, repeats: int) -> None:
    from fieldreid.cli.common import configured_model
    from fieldreid.defaults import default_model
    from fieldreid.embed.thresholds import choose_model_thresholds, describe, write_model_thresholds

    path = embedder or configured_model("embedder") or default_model("embedder")
    if path.suffix.lower() != ".onnx":
        raise InputError(f"--into-model writes ONNX metadata: {path} is not an .onnx file (build TensorRT plans "
                         "after the thresholds are in the ONNX).")
    emb = _open_embedder(path, backend)
    det = _open_crop_detector(detector, backend, conf) if crops else _open_detector(detector, backend, conf)
    with _progress(0, "embed") as progress:
        task = progress.add_task("embed", total=None)
        info = choose_model_thresholds(emb, metadata, split, crops, det, batch, seed, repeats,
                                       lambda n: progress.update(task, completed=n))
    emb.close()
    write_model_thresholds(path, info)
    out.print(f"{path}: upper {info['upper']:.4f}, lower {info['lower']:.4f} ({describe(info)}; open-set GM "
              f"{info['geometric_mean']:.3f} on that data)", highlight=False)


# ------------------------------------------------------------------------------------------ gallery sub-app
gallery_app = typer.Typer(no_args_is_help=True, help="Inspect and curate an identity gallery.")


@gallery_app.command("info")
@_friendly
def info_cmd(gallery: GalleryOpt) -> None:
    """Model, counts, version and thresholds of a gallery."""
    from fieldreid.gallery.store import Gallery

    with Gallery(gallery, create=False) as g:
        t = Table(title=str(gallery), title_justify="left", show_header=False)
        ids = g.identities()
        for k, v in (("schema", g.schema_version), ("version", g.version), ("model", g.model_id or "-"),
                     ("dim / storage", f"{g.dim or '-'} / {g.storage}"),
                     ("identities", f"{len(ids)} ({sum(i.status == 'provisional' for i in ids)} provisional)"),
                     ("embeddings", g.count_embeddings()), ("sightings", g.count_sightings())):
            t.add_row(k, str(v))
        ths = g.all_thresholds()
        for th in ths:
            t.add_row(f"thresholds {th.species}", f"lower {th.lower:.4f} upper {th.upper:.4f} ({th.method}, "
                                                  f"{th.model_id})")
        if not ths:
            from fieldreid.gallery.openset import DEFAULT_LOWER, DEFAULT_UPPER

            t.add_row("thresholds", f"uncalibrated defaults: lower {DEFAULT_LOWER} upper {DEFAULT_UPPER}")
        for sp, model, data in g.read("SELECT species, model_id, data FROM fusion ORDER BY species, model_id"):
            f = json.loads(data)
            e = f.get("evidence") or {}
            if f.get("uses_inliers"):
                t.add_row(f"verification {sp}", f"{'on' if f.get('pays') else 'off (does not pay)'}: held-out top-1 "
                                                f"{e.get('top1_without', float('nan')):.3f} → "
                                                f"{e.get('top1_with', float('nan')):.3f}, K={f.get('k')} ({model})")
            cos = f if not f.get("uses_inliers") else f.get("cosine_only")
            t.add_row(f"probability {sp}", f"{'fused where verified, ' if f.get('uses_inliers') else ''}"
                                           + (f"cosine-only fit, unknown fraction "
                                              f"{(cos.get('evidence') or {}).get('unknown_fraction', '?')} ({model})"
                                              if cos else
                                              "none for unverified crops (run `fieldreid calibrate` again)"))
        from fieldreid.gallery.enroll import feature_caps
        from fieldreid.verify.features import kind_for

        n_emb = g.count_embeddings()
        for cap in feature_caps(g) if n_emb else []:
            t.add_row(f"local features ({cap} keypoints)",
                      f"{n_emb - len(g.missing_local_features(kind_for(cap)))} of {n_emb} images "
                      "(`fieldreid gallery reindex` fills the rest)")
        out.print(t)


@gallery_app.command("list")
@_friendly
def list_cmd(gallery: GalleryOpt,
             species: Annotated[str | None, typer.Option(help="Only this species.")] = None,
             status: Annotated[str | None, typer.Option(help="confirmed | provisional")] = None) -> None:
    """List identities with their embedding and sighting counts."""
    from fieldreid.gallery.store import Gallery
    from fieldreid.gallery.suggest import suggestions

    with Gallery(gallery, create=False) as g:
        rows = g.identities(species, status)
        sugg = suggestions(g)
    t = Table(title=f"{len(rows)} identities in {gallery}", title_justify="left")
    cols = ["id", "name", "species", "status", "origin", "embeddings", "sightings", "updated"]
    for col in cols + (["suggested match"] if sugg else []):
        t.add_column(col)
    for i in rows:
        cells = [i.id, i.name or "", i.species, i.status, i.origin, str(i.n_embeddings), str(i.n_sightings), i.updated]
        if sugg:
            sg = sugg.get(i.id)
            cells.append(f"{sg.candidate_id} ({sg.decision}, {sg.score:.3f})" if sg else "")
        t.add_row(*cells)
    out.print(t)


@gallery_app.command("show")
@_friendly
def show_cmd(identity: Annotated[str, typer.Argument(help="Identity id.")], gallery: GalleryOpt,
             sightings: Annotated[int, typer.Option(help="Most recent sightings to list.")] = 10) -> None:
    """One identity: its embeddings (ids for `split`), recent sightings and change history."""
    from fieldreid.gallery.store import Gallery
    from fieldreid.gallery.suggest import suggestions

    with Gallery(gallery, create=False) as g:
        i = g.get_identity(identity)
        embs = g.embeddings(identity)
        sig = [s for s in g.sightings(identity)][-sightings:] if sightings else []
        log = g.log(20, identity)
        sg = suggestions(g, identity).get(identity)
    out.print(f"[bold]{i.id}[/] {i.name or ''} — {i.species}, {i.status}, {i.origin}; created {i.created}, "
              f"updated {i.updated}", highlight=False)
    if sg is not None:
        out.print(f"suggested match: {sg.candidate_id} ({sg.candidate_species}), {sg.decision}, score "
                  f"{sg.score:.3f} (thresholds {sg.lower:.3f}/{sg.upper:.3f}); accept with `fieldreid gallery merge "
                  f"{i.id} --into {sg.candidate_id}`", highlight=False)
    t = Table(title=f"{len(embs)} embeddings", title_justify="left")
    for col in ("embedding id", "source", "box", "model", "created"):
        t.add_column(col, overflow="fold")
    for e in embs:
        t.add_row(str(e.id), e.source, e.box or "(whole image)", e.model_id, e.created)
    out.print(t)
    if sig:
        t = Table(title=f"last {len(sig)} of {i.n_sightings} sightings", title_justify="left")
        for col in ("image", "decision", "score", "runner-up", "captured", "created"):
            t.add_column(col, overflow="fold")
        for s in sig:
            t.add_row(s["image"], s["decision"], f"{s['score']:.3f}" if s["score"] is not None else "",
                      f"{s['runner_up_id'] or ''} {s['runner_up_score'] or ''}", s["captured"] or "", s["created"])
        out.print(t)
    for c in log:
        out.print(f"  {c.at} {c.who}: {c.action} {json.dumps(c.details)}", highlight=False)


@gallery_app.command("rename")
@_friendly
def rename_cmd(identity: Annotated[str, typer.Argument(help="Identity id.")], gallery: GalleryOpt,
               to: Annotated[str | None, typer.Option("--to", help="New id.")] = None,
               name: Annotated[str | None, typer.Option(help="New display name.")] = None,
               who: WhoOpt = None) -> None:
    """Change an identity's id (embeddings and sightings follow) and/or its name."""
    from fieldreid.gallery.store import Gallery

    if to is None and name is None:
        raise InputError("Give --to NEW_ID and/or --name NAME.")
    with Gallery(gallery, create=False, who=who) as g:
        new = g.rename(identity, to, name)
    err.print(f"renamed {identity} → {new}")


@gallery_app.command("merge")
@_friendly
def merge_cmd(sources: Annotated[list[str], typer.Argument(help="Identities to merge away.")],
              into: Annotated[str, typer.Option("--into", help="Identity that keeps everything.")],
              gallery: GalleryOpt, who: WhoOpt = None) -> None:
    """Merge identities: their embeddings and sightings move to --into; they are removed."""
    from fieldreid.gallery.store import Gallery

    with Gallery(gallery, create=False, who=who) as g:
        n = g.merge(sources, into)
    err.print(f"merged {', '.join(sources)} into {into} ({n} embeddings moved)")


@gallery_app.command("split")
@_friendly
def split_cmd(identity: Annotated[str, typer.Argument(help="Identity to split.")],
              embeddings: Annotated[list[int], typer.Argument(help="Embedding ids to move (see `gallery show`).")],
              gallery: GalleryOpt,
              new_id: Annotated[str | None, typer.Option(help="Id of the new identity (default: provisional).")] = None,
              name: Annotated[str | None, typer.Option(help="Name of the new identity.")] = None,
              who: WhoOpt = None) -> None:
    """Move some embeddings (and their sightings) to a new identity."""
    from fieldreid.gallery.store import Gallery

    with Gallery(gallery, create=False, who=who) as g:
        new = g.split(identity, embeddings, new_id, name)
    err.print(f"moved {len(embeddings)} embeddings of {identity} to {new}")


@gallery_app.command("confirm")
@_friendly
def confirm_cmd(identity: Annotated[str, typer.Argument(help="Provisional identity.")], gallery: GalleryOpt,
                as_id: Annotated[str | None, typer.Option("--as", help="Permanent id, e.g. nyala-0042.")] = None,
                name: Annotated[str | None, typer.Option(help="Display name.")] = None,
                who: WhoOpt = None) -> None:
    """Mark a provisional identity as confirmed (optionally giving it a permanent id)."""
    from fieldreid.gallery.store import Gallery

    with Gallery(gallery, create=False, who=who) as g:
        new = g.confirm(identity, as_id, name)
    err.print(f"confirmed {new}")


@gallery_app.command("delete")
@_friendly
def delete_cmd(identity: Annotated[str, typer.Argument(help="Identity to delete.")], gallery: GalleryOpt,
               yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
               who: WhoOpt = None) -> None:
    """Delete an identity and its embeddings (its sightings stay as history)."""
    from fieldreid.gallery.store import Gallery

    with Gallery(gallery, create=False, who=who) as g:
        i = g.get_identity(identity)
        if not yes and not typer.confirm(f"Delete {i.id} ({i.n_embeddings} embeddings)?"):
            raise typer.Exit(1)
        n = g.delete(identity)
    err.print(f"deleted {identity} ({n} embeddings)")


@gallery_app.command("reindex")
@_friendly
def reindex_cmd(gallery: GalleryOpt,
                keypoints: Annotated[int | None, typer.Option(
                    help="Keypoint cap per crop; default: the cap the gallery's verification was calibrated "
                         "on, else the default cap.")] = None) -> None:
    """Compute the local features (verification) of every gallery image that has none."""
    from fieldreid.gallery.enroll import index_features, missing_features
    from fieldreid.gallery.store import Gallery
    from fieldreid.verify.features import kind_for

    if keypoints is not None:
        kind_for(keypoints)  # a clear error for a cap out of range
    with Gallery(gallery, create=False) as g:
        todo = len(missing_features(g, keypoints))
        with _progress(todo, "reindex") as progress:
            task = progress.add_task("reindex", total=todo)
            done, lost = index_features(g, keypoints, lambda n: progress.update(task, completed=n))
    err.print(f"local features computed for {done} of {todo} gallery images without them; {len(lost)} unreadable")
    _print_failures(lost)


@gallery_app.command("log")
@_friendly
def log_cmd(gallery: GalleryOpt,
            limit: Annotated[int, typer.Option(help="Entries to show (newest first).")] = 50,
            identity: Annotated[str | None, typer.Option(help="Only entries mentioning this identity.")] = None
            ) -> None:
    """The change log: every enrol, rename, merge, split, confirm, delete and threshold change."""
    from fieldreid.gallery.store import Gallery

    with Gallery(gallery, create=False) as g:
        rows = g.log(limit, identity)
    t = Table(title=f"changes in {gallery}", title_justify="left")
    for col in ("version", "at", "who", "action", "details"):
        t.add_column(col, overflow="fold")
    for c in rows:
        t.add_row(str(c.gallery_version), c.at, c.who, c.action, json.dumps(c.details))
    out.print(t)


def register(app: typer.Typer) -> None:
    """Add ``enroll``, ``identify``, ``eval``, ``calibrate`` and the ``gallery`` sub-app to ``app``."""
    app.command("enroll")(_friendly(enroll_cmd))
    app.command("identify")(_friendly(identify_cmd))
    app.command("eval")(_friendly(eval_cmd))
    app.command("calibrate")(_friendly(calibrate_cmd))
    app.add_typer(gallery_app, name="gallery")
