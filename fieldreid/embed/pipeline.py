"""Image → detections → crops → embeddings, one image stream, bounded memory.

Decoding runs one batch ahead in a background thread (OpenCV and ONNX Runtime release the GIL), so the
CPU decodes the next JPEGs while the detector runs. The queue is bounded: memory stays flat on folders of
any size.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldreid.errors import ImageReadError
from fieldreid.frames.decode import Frame, read_image
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
    #: (N, 4) full-resolution box of each embedding row (``crops`` and ``embeddings`` follow it)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    #: True when the one embedding is of the whole image (``select="crop"``, or ``whole_if_none``, with no
    #: animal box found); ``animal_index`` is empty then
    whole_image: bool = False


def _decode(paths: list[Path], min_side: int | None, keep_data: bool) -> list[Frame | ImageResult]:
    out: list[Frame | ImageResult] = []
    for p in paths:
        try:
            out.append(read_image(p, min_side=min_side, keep_data=keep_data))
        except ImageReadError as exc:
            out.append(ImageResult(path=p, failure=exc.reason))
        except MemoryError:
            out.append(ImageResult(path=p, failure="image too large to decode in memory"))
        except Exception as exc:  # any other decoder failure concerns this file only
            out.append(ImageResult(path=p, failure=f"the decoder failed ({type(exc).__name__}: {exc})"[:300]))
    return out


#: how often a consumer waiting for the reader thread looks at its stop request (only while waiting)
STOP_POLL_S = 0.2
#: after a stop request, how long the consumer waits for a reader thread to finish before leaving it
#: (a daemon thread stuck in a read the kernel will not interrupt must not keep the process alive)
STOP_GRACE_S = 1.0


def prefetch_batches(batches: Iterable[list[Path]], fn: Callable[[list[Path]], list], depth: int = 1,
              stop_requested: threading.Event | None = None) -> Iterator[list]:
    """``fn`` of each batch, computed one batch ahead in a thread. With ``stop_requested``: once it is set
    the iteration ends within :data:`STOP_POLL_S`, even while the thread is blocked (a read that hangs)."""
    requested = stop_requested
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
            if requested is None:
                item = q.get()
            else:
                try:
                    item = q.get(timeout=STOP_POLL_S)
                except queue.Empty:
                    if requested.is_set():
                        return
                    continue
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        give_up = time.monotonic() + STOP_GRACE_S if requested is not None and requested.is_set() else None
        while t.is_alive():  # unblock a worker waiting on a full queue
            if give_up is not None and time.monotonic() > give_up:
                break  # stuck in a read: it is a daemon thread and checks `stop` before its next batch
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


class StageTimes:
    """Seconds spent per stage (decode, detect, crop, embed, database...), summed; thread-safe, always on.

    >>> times = StageTimes()
    >>> with times("detect"):
    ...     pass
    >>> sorted(times.per_image_ms(1))
    ['detect']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def __call__(self, stage: str) -> _Timed:
        return _Timed(self, stage)

    def per_image_ms(self, images: int) -> dict[str, float]:
        """Milliseconds per image of each stage (stages in the order they were first timed)."""
        with self._lock:
            return {k: round(1e3 * v / max(1, images), 2) for k, v in self.seconds.items()}

    def reset(self) -> None:
        with self._lock:
            self.seconds.clear()


class _Timed:
    __slots__ = ("times", "stage", "start")

    def __init__(self, times: StageTimes, stage: str) -> None:
        self.times, self.stage = times, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.times.add(self.stage, time.perf_counter() - self.start)


class Pipeline:
    """Detector plus optional embedder over a stream of image paths; crops by :mod:`fieldreid.crop`.

    ``select`` says which boxes are embedded: ``"all"`` animal boxes at or above ``min_crop_conf`` (camera
    frames: ``watch``, ``identify``); ``"crop"``, the animal of a labelled crop: the most confident animal
    box covering :data:`~fieldreid.crop.MIN_COVER` of the image (:func:`fieldreid.crop.choose_animal`),
    else the whole image; ``"best"``, the animal of a labelled frame: the same box, else the most confident
    animal box of any size (``whole_if_none``: else the whole image, as ``eval`` does). So a photo enrolled
    as a crop or as a frame gives the same box whenever one covers a quarter of it. Without a detector every
    image is its own box (``"crop"`` only).

    ``rescue_conf`` (``watch``): a frame with no animal box at ``min_crop_conf`` keeps its single most
    confident animal box at or above ``rescue_conf``, and the frame's detections are trimmed to the boxes at
    ``min_crop_conf`` plus that one (the detector must run at ``rescue_conf`` or lower). A camera trap fires on
    motion: a frame with nothing confident usually holds an animal the detector is unsure of (the camtrap
    images against MegaDetector v5: 7 of 21 such frames get a box, all 7 on a MegaDetector animal).

    >>> pipe = Pipeline(Detector(default_model("detector")), Embedder(default_model("embedder")))  # doctest: +SKIP
    >>> for result in pipe.run(paths):                                                          # doctest: +SKIP
    ...     print(result.path, result.failure or len(result.detections))
    """

    def __init__(self, detector, embedder=None, batch_size: int = 4, reduced_decode: bool = True,
                 embed_categories: tuple[int, ...] = (1,), min_crop_conf: float = 0.0,
                 keep_crops: bool = False, prefetch: bool = True, select: str = "all",
                 whole_if_none: bool = False, crop_side: int | None = None,
                 rescue_conf: float | None = None) -> None:
        if select not in ("all", "best", "crop"):
            raise ValueError(f"select must be all, best or crop, got {select!r}")
        if rescue_conf is not None and (select != "all" or not 0.0 < rescue_conf <= min_crop_conf):
            raise ValueError(f"rescue_conf needs select='all' and 0 < rescue_conf <= min_crop_conf "
                             f"({min_crop_conf}), got {rescue_conf}")
        self.rescue_conf = rescue_conf
        if detector is None and select != "crop":
            raise ValueError("Without a detector only select='crop' (the whole image as the box) is possible.")
        self.detector = detector
        self.embedder = embedder
        self.select = select
        self.whole_if_none = whole_if_none or select == "crop"
        # crops are cut for the embedder (its input side), or, without one, at crop_side (keep_crops)
        self.crop_side = int(min(embedder.preprocess_spec.size)) if embedder is not None else crop_side
        self.batch_size = max(1, batch_size)
        self.reduced_decode = reduced_decode
        self.embed_categories = embed_categories
        self.min_crop_conf = min_crop_conf
        self.keep_crops = keep_crops
        self.prefetch = prefetch
        #: time spent in detect / crop / embed (and decode, when this pipeline decodes)
        self.times = StageTimes()

    @property
    def detector_min_side(self) -> int | None:
        if self.detector is None:  # only crops are cut: decode small, crop.crops() decodes what each needs
            return self.crop_side if self.reduced_decode else None
        return int(max(self.detector.input_size)) if self.reduced_decode else None

    def run(self, paths: Iterable[Path]) -> Iterator[ImageResult]:
        min_side = self.detector_min_side
        keep = self.crop_side is not None

        def decode(batch: list[Path]) -> list:
            with self.times("decode"):
                return _decode(batch, min_side, keep)

        batches = _batched(paths, self.batch_size)
        decoded = prefetch_batches(batches, decode) if self.prefetch else map(decode, batches)
        for items in decoded:
            yield from self.process(items)

    def process(self, items: list[Frame | ImageResult]) -> list[ImageResult]:
        frames = [it for it in items if isinstance(it, Frame)]
        if self.detector is None:
            dets = [Detections.empty() for _ in frames]
        else:
            with self.times("detect"):
                dets = self.detector.detect([f.pixels for f in frames]) if frames else []
        by_frame: dict[int, ImageResult] = {}
        cut: list[tuple[ImageResult, list[np.ndarray]]] = []
        for frame, det in zip(frames, dets, strict=True):
            sy, sx = frame.scale
            full = Detections(det.xyxy * np.array([sx, sy, sx, sy], np.float32), det.confidence, det.class_id,
                              det.category)
            if self.rescue_conf is not None:
                full = self._rescue(full)
            res = ImageResult(path=frame.path, size=frame.size, detections=full)
            if self.crop_side is not None:
                with self.times("crop"):
                    cut.append((res, self._crops(frame, res)))
            by_frame[id(frame)] = res
        if self.embedder is not None and cut:
            # one embedder call for the crops of the whole batch (a labelled image has one crop: batch 1 is slow)
            with self.times("embed"):
                vectors = self.embedder.embed([c for _, cs in cut for c in cs])
            start = 0
            for res, cs in cut:
                res.embeddings = vectors[start:start + len(cs)]
                start += len(cs)
        return [by_frame[id(it)] if isinstance(it, Frame) else it for it in items]

    def _rescue(self, det: Detections) -> Detections:
        """The boxes at ``min_crop_conf``, plus, in a frame with no animal among them, its most confident
        animal box at ``rescue_conf`` or above (see the class docstring)."""
        keep = det.confidence >= self.min_crop_conf
        animal = np.isin(det.category, self.embed_categories)
        if not (keep & animal).any():
            weak = np.flatnonzero(animal & (det.confidence >= self.rescue_conf))
            if len(weak):
                keep[weak[np.argmax(det.confidence[weak])]] = True
        if keep.all():
            return det
        return Detections(det.xyxy[keep], det.confidence[keep], det.class_id[keep], det.category[keep])

    def _crops(self, frame: Frame, res: ImageResult) -> list[np.ndarray]:
        """Choose the boxes to embed (``select``) and cut them by the crop rule; sets ``animal_index``,
        ``boxes``, ``whole_image`` and (``keep_crops``) ``crops``."""
        from fieldreid.crop import MIN_COVER, choose_animal, crops, whole_box

        det = res.detections
        assert det is not None
        if self.select == "all":
            lowest = self.min_crop_conf if self.rescue_conf is None else self.rescue_conf  # trimmed by _rescue
            keep = np.isin(det.category, self.embed_categories) & (det.confidence >= lowest)
            idx = np.flatnonzero(keep)
        else:
            best = choose_animal(det.confidence, det.category, det.xyxy, frame.size, self.min_crop_conf, MIN_COVER)
            if best is None and self.select == "best":  # a frame's animal may be small: any animal box then
                best = choose_animal(det.confidence, det.category, det.xyxy, frame.size, self.min_crop_conf)
            idx = np.zeros(0, np.int64) if best is None else np.array([best], np.int64)
        res.animal_index = idx
        boxes = det.xyxy[idx]
        if len(idx) == 0 and self.whole_if_none:
            boxes = np.array([whole_box(frame.size)], np.float32)
            res.whole_image = True
        res.boxes = boxes
        cut = crops(frame, boxes, self.crop_side) if len(boxes) else []
        if self.keep_crops:
            res.crops = cut
        return cut
