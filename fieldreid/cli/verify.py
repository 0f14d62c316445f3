"""``fieldreid verify A.jpg B.jpg --out pair.jpg``: do two photos show the same animal? The local-feature
evidence, drawn.

:mod:`fieldreid.cli.app` calls :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fieldreid.cli.common import BackendOpt, DetectorOpt, EmbedderOpt, err, out
from fieldreid.cli.common import friendly as _friendly
from fieldreid.errors import FieldreidError, InputError
from fieldreid.verify.features import MAX_KEYPOINTS


def _animal_crop(path: Path, det, crops: bool, side: int):
    """The crop of ``path``'s animal by the one crop rule, and whether it is the whole image."""
    from fieldreid.embed.pipeline import Pipeline

    pipe = Pipeline(det, None, batch_size=1, keep_crops=True, crop_side=side, prefetch=False,
                    select="crop" if crops or det is None else "best", whole_if_none=True)
    [res] = list(pipe.run([path]))
    if res.failure:
        raise FieldreidError(f"{path}: {res.failure}")
    return res.crops[0], res.whole_image


@_friendly
def verify(
    image_a: Annotated[Path, typer.Argument(help="First photo (a crop or a camera frame).")],
    image_b: Annotated[Path, typer.Argument(help="Second photo.")],
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Picture to write (.jpg/.png): both "
                                                                      "crops with a line per inlier match.")] = None,
    crops: Annotated[bool, typer.Option("--crops/--frames", help="The photos are animal crops (the animal is "
                                                                 "the box covering a quarter, else the whole "
                                                                 "photo) or camera frames (the most confident "
                                                                 "animal box).")] = True,
    keypoints: Annotated[int, typer.Option(help="Keypoint cap per crop.")] = MAX_KEYPOINTS,
    ratio: Annotated[float, typer.Option(help="Lowe's ratio test.")] = 0.8,
    method: Annotated[str, typer.Option(help="Geometric model and estimator: fundamental-ransac, "
                                             "fundamental-usac, homography-ransac, homography-usac.")] =
    "fundamental-ransac",
    detector: DetectorOpt = None,
    embedder: EmbedderOpt = None,
    backend: BackendOpt = "auto",
    conf: Annotated[float, typer.Option(help="Detector confidence for animal boxes.")] = 0.2,
) -> None:
    """Match two photos' animals with local features (RootSIFT + RANSAC); print the inlier count and the
    embedder's cosine, and draw the inlier matches."""
    import cv2
    import numpy as np

    from fieldreid.cli.common import open_crop_detector, open_embedder
    from fieldreid.storage.fsutil import atomic_write_bytes
    from fieldreid.verify.features import FEATURE_SIDE, extract
    from fieldreid.verify.match import draw_matches, match

    suffix = out_path.suffix.lower() if out_path is not None else ".jpg"
    if suffix not in (".jpg", ".jpeg", ".png"):
        raise InputError(f"--out must end in .jpg, .jpeg or .png, got {out_path}.")
    det = open_crop_detector(detector, backend, conf)
    pics = [_animal_crop(p, det, crops, FEATURE_SIDE) for p in (image_a, image_b)]
    fa, fb = (extract(px, keypoints) for px, _ in pics)
    m = match(fa, fb, ratio, method)
    cosine = None
    try:
        emb = open_embedder(embedder, backend)
    except FieldreidError as exc:
        if embedder is not None:
            raise
        err.print(f"[yellow]note:[/] no embedder ({exc}); cosine not shown", highlight=False)
    else:
        side = int(min(emb.preprocess_spec.size))
        va = emb.embed([_animal_crop(image_a, det, crops, side)[0]])
        vb = emb.embed([_animal_crop(image_b, det, crops, side)[0]])
        cosine = float(np.dot(va[0], vb[0]))
    whole = [str(p.name) for p, (_, w) in zip((image_a, image_b), pics, strict=True) if w]
    out.print(f"{m.n_inliers} inlier matches of {m.n_tentative} tentative ({len(fa)} / {len(fb)} keypoints, "
              f"{method}, ratio {ratio})" + (f"; cosine {cosine:.4f}" if cosine is not None else ""), highlight=False)
    if whole:
        err.print(f"no animal box found in {', '.join(whole)}: the whole photo was used", highlight=False)
    if out_path is not None:
        title = f"{m.n_inliers} inliers / {m.n_tentative} matches" + (f", cosine {cosine:.3f}" if cosine is not None else "")
        pic = draw_matches(pics[0][0], fa, pics[1][0], fb, m, title=title)
        ok, buf = cv2.imencode(".png" if suffix == ".png" else ".jpg", pic)
        if not ok:
            raise FieldreidError(f"Could not encode the match picture for {out_path}.")
        atomic_write_bytes(out_path, buf.tobytes())
        err.print(f"→ {out_path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
