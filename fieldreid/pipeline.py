"""Image → detections → crops → embeddings, one image stream, bounded memory.

Decoding runs one batch ahead in a background thread (OpenCV and ONNX Runtime release the GIL), so the
CPU decodes the next JPEGs while the detector runs. The queue is bounded: memory stays flat on folders of
any size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldreid.errors import ImageReadError
from fieldreid.imageio import Frame, frame_for_boxes, read_image, to_frame_coords
from fieldreid.types import Detections


@dataclass
class ImageResult:
    """What happened to one file: detections (full-resolution pixels) or a failure reason."""

    path: Path
    size: tuple[int, int] | None = None
    detections: Detections | None = None
    failure: str | None = None
    #: (N_animals, D) embeddings of the animal detections, in the order of ``animal_index``
    embeddings: np.ndarray | None = None
    animal_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    crops: list[np.ndarray] | None = None


def _decode(paths: list[Path], min_side: int | None, keep_data: bool) -> list[Frame | ImageResult]:
    out: list[Frame | ImageResult] = []
    for p in paths:
        try:
            out.append(read_image(p, min_side=min_side, keep_data=keep_data))
        except ImageReadError as exc:
            out.append(ImageResult(path=p, failure=exc.reason))
        except MemoryError:
            out.append(ImageResult(path=p, failure="image too large to decode in memory"))
    return out


def _prefetch(batches: Iterable[list[Path]], fn: Callable[[list[Path]], list], depth: int = 1) -> Iterator[list]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put(fn(b))
        except BaseException as exc:  # surface errors in the consumer thread
            q.put(exc)
        finally:
            q.put(done)

    t = threading.Thread(target=worker, name="fieldreid-decode", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


def _batched(items: Iterable[Path], n: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    for it in items:
        batch.append(Path(it))
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class Pipeline:
    """Detector plus optional embedder over a stream of image paths.

    >>> pipe = Pipeline(Detector(default_model("detector")), Embedder(default_model("embedder")))  # doctest: +SKIP
    >>> for result in pipe.run(paths):                                                          # doctest: +SKIP
    ...     print(result.path, result.failure or len(result.detections))
    """

    def __init__(self, detector, embedder=None, batch_size: int = 4, reduced_decode: bool = True,
                 embed_categories: tuple[int, ...] = (1,), min_crop_conf: float = 0.0,
                 keep_crops: bool = False, prefetch: bool = True) -> None:
        self.detector = detector
        self.embedder = embedder
        self.batch_size = max(1, batch_size)
        self.reduced_decode = reduced_decode
        self.embed_categories = embed_categories
        self.min_crop_conf = min_crop_conf
        self.keep_crops = keep_crops
        self.prefetch = prefetch

    @property
    def detector_min_side(self) -> int | None:
        return int(max(self.detector.input_size)) if self.reduced_decode else None

    def run(self, paths: Iterable[Path]) -> Iterator[ImageResult]:
        min_side = self.detector_min_side
        keep = self.embedder is not None

        def decode(batch: list[Path]) -> list:
            return _decode(batch, min_side, keep)

        batches = _batched(paths, self.batch_size)
        decoded = _prefetch(batches, decode) if self.prefetch else map(decode, batches)
        for items in decoded:
            yield from self._process(items)

    def _process(self, items: list[Frame | ImageResult]) -> list[ImageResult]:
        frames = [it for it in items if isinstance(it, Frame)]
        dets = self.detector.detect([f.pixels for f in frames]) if frames else []
        by_frame: dict[int, ImageResult] = {}
        for frame, det in zip(frames, dets, strict=True):
            sy, sx = frame.scale
            full = Detections(det.xyxy * np.array([sx, sy, sx, sy], np.float32), det.confidence, det.class_id,
                              det.category)
            res = ImageResult(path=frame.path, size=frame.size, detections=full)
            if self.embedder is not None:
                self._embed(frame, res)
            by_frame[id(frame)] = res
        return [by_frame[id(it)] if isinstance(it, Frame) else it for it in items]

    def _embed(self, frame: Frame, res: ImageResult) -> None:
        from fieldreid.embed.runtime import square_crop

        det = res.detections
        assert det is not None
        keep = np.isin(det.category, self.embed_categories) & (det.confidence >= self.min_crop_conf)
        idx = np.flatnonzero(keep)
        res.animal_index = idx
        if len(idx) == 0:
            res.embeddings = np.zeros((0, self.embedder.dim), np.float32)
            return
        side = int(min(self.embedder.preprocess_spec.size))
        src = frame_for_boxes(frame, det.xyxy[idx], side)
        boxes = to_frame_coords(src, det.xyxy[idx])
        crops = [square_crop(src.pixels, tuple(float(v) for v in b)) for b in boxes]
        res.embeddings = self.embedder.embed(crops)
        if self.keep_crops:
            res.crops = crops
