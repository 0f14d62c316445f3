"""Reading camera-trap frames: which files to read, how to decode them, what their EXIF says.

* :mod:`fieldreid.frames.files` — the one walk over image folders and the one "needs work" rule.
* :mod:`fieldreid.frames.decode` — bounded, EXIF-oriented, reduced-size decoding with clear failure reasons.
* :mod:`fieldreid.frames.exif` — capture time, camera make/model, position.

numpy, OpenCV and Pillow only.
"""
