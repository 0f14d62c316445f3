"""Enrolment with a real (tiny) ONNX embedder: CSV and folder sources, bad files, idempotency, re-embedding."""

from __future__ import annotations

import numpy as np
import pytest
from test_gallery_helpers import COLOURS, tiny_embedder_onnx, write_image

from fieldreid.embed.runtime import Embedder
from fieldreid.errors import InputError
from fieldreid.gallery import (
    Gallery,
    GalleryError,
    ModelMismatchError,
    Searcher,
    enroll,
    read_metadata,
    reembed,
)
from fieldreid.types import Detections


@pytest.fixture(scope="module")
def embedders(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    a = Embedder(tiny_embedder_onnx(d / "a.onnx", "tiny-a", seed=0), backend="onnxruntime")
    b = Embedder(tiny_embedder_onnx(d / "b.onnx", "tiny-b", dim=6, seed=1), backend="onnxruntime")
    return a, b


def make_dataset(root, n_ids=4, per_id=3):
    """metadata.csv (database + query splits) plus one missing and one corrupt file."""
    rows = ["image_id,identity,path,species,split"]
    for i in range(n_ids):
        for j in range(per_id):
            split = "query" if j == per_id - 1 else "database"
            rel = f"images/{split}/z{i}/{j}.png"
            write_image(root / rel, COLOURS[i], jitter=6, seed=10 * i + j)
            rows.append(f"z{i}-{j},z{i},{rel},zebra,{split}")
    rows.append("gone,z0,images/database/z0/missing.png,zebra,database")
    (root / "images/database/z1/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append("broken,z1,images/database/z1/broken.jpg,zebra,database")
    rows.append("unlabelled,,images/query/z0/2.png,zebra,test")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root / "metadata.csv"


def test_read_metadata_splits_and_errors(tmp_path):
    csv = make_dataset(tmp_path)
    assert len(read_metadata(csv)) == 14  # the unlabelled row is skipped
    db = read_metadata(csv, split="database")
    assert len(db) == 10 and db[0].path == tmp_path / "images/database/z0/0.png" and db[0].species == "zebra"
    with pytest.raises(InputError, match="database, query, test"):
        read_metadata(csv, split="train")
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(InputError, match="identity, path"):
        read_metadata(tmp_path / "bad.csv")


def test_enrol_csv_reports_bad_files_and_is_idempotent(tmp_path, embedders):
    emb, _ = embedders
    csv = make_dataset(tmp_path)
    with Gallery(tmp_path / "g.db") as g:
        rep = enroll(csv, g, emb, split="database", crops=True)
        assert rep.added == 8 and rep.identities_created == 4
        failed = {p.split("/")[-1]: why for p, why in rep.failures}
        assert set(failed) == {"missing.png", "broken.jpg"}
        assert failed["missing.png"] == "missing.png: file disappeared before it could be read"
        assert failed["broken.jpg"].startswith("broken.jpg: not an image file, or its header is corrupt")
        assert g.model_id == "tiny-a" and g.get_identity("z2").n_embeddings == 2
        v = g.version
        again = enroll(csv, g, emb, split="database", crops=True)
        assert again.added == 0 and again.already_present == 8 and g.version == v
        # queries of enrolled animals find them
        q = read_metadata(csv, split="query")
        from fieldreid.frames.decode import read_image

        vec = emb.embed([read_image(it.path).pixels for it in q])
        res = Searcher(g).search(vec, k=2, model_id=emb.model_id)
        assert [r.best[0] for r in res] == [it.identity for it in q]
        assert min(r.best[1] for r in res) > 0.99


def test_enrol_folder_source(tmp_path, embedders):
    emb, _ = embedders
    for i in range(3):
        for j in range(2):
            write_image(tmp_path / "lynx" / f"L{i}" / f"{j}.png", COLOURS[i], jitter=4, seed=j)
    with Gallery(tmp_path / "g.db") as g:
        rep = enroll(tmp_path / "lynx", g, emb, crops=True, species="lynx")
        assert rep.added == 6 and not rep.failures
        assert {i.id: i.species for i in g.identities()} == {"L0": "lynx", "L1": "lynx", "L2": "lynx"}


def test_enrol_from_another_model_is_refused_then_reembedded(tmp_path, embedders):
    a, b = embedders
    csv = make_dataset(tmp_path)
    with Gallery(tmp_path / "g.db") as g:
        enroll(csv, g, a, split="database", crops=True)
        with pytest.raises(ModelMismatchError, match="tiny-a.*tiny-b"):
            enroll(csv, g, b, split="query", crops=True)
        n, lost = reembed(g, b)
        assert n == 8 and lost == [] and g.model_id == "tiny-b" and g.dim == 6
        assert g.log()[0].action == "reembed"
        rep = enroll(csv, g, b, split="query", crops=True)
        assert rep.added == 4
        (tmp_path / "images/database/z3/0.png").unlink()
        with pytest.raises(GalleryError, match="nothing was changed"):
            reembed(g, a)
        assert g.model_id == "tiny-b"
        n, lost = reembed(g, a, drop_missing=True)
        assert n == 11 and len(lost) == 1 and g.model_id == "tiny-a"


class FakeDetector:
    """Two animal boxes per image: a low-confidence one on the background, a confident one on the animal."""

    input_size = (64, 64)
    model_id = "fake-detector"

    def detect(self, images):
        return [Detections(np.array([[0, 0, 40, 40], [52, 52, 92, 92]], np.float32), np.array([0.3, 0.9]),
                           np.zeros(2), np.ones(2)) for _ in images]


def test_enrol_whole_images_takes_the_most_confident_animal(tmp_path, embedders):
    emb, _ = embedders
    img = np.empty((96, 96, 3), np.uint8)
    img[:] = COLOURS[0]
    img[48:, 48:] = COLOURS[1]
    import cv2

    cv2.imwrite(str(tmp_path / "cam.png"), img)
    (tmp_path / "metadata.csv").write_text("image_id,identity,path,species,split\nc,b1,cam.png,nyala,train\n")
    with Gallery(tmp_path / "g.db") as g:
        rep = enroll(tmp_path / "metadata.csv", g, emb, detector=FakeDetector())
        assert rep.added == 1
        [row] = g.embeddings()
        assert row.box == "52.0,52.0,92.0,92.0"
        from fieldreid.crop import cut

        rule = emb.embed([cut(img, (52, 52, 92, 92))])[0]  # the most confident box, cut by the crop rule
        other = emb.embed([cut(img, (0, 0, 40, 40))])[0]
        stored = g.load_vectors().matrix[0]
        assert float(stored @ rule) > 0.9999 and float(stored @ other) < float(stored @ rule)
        with pytest.raises(InputError, match="detector"):
            enroll(tmp_path / "metadata.csv", g, emb)
