"""Everything that writes a model artefact (lab side; torch, timm, onnx: the ``train`` extra).

* :mod:`fieldreid.export.run` — what ``fieldreid export`` and ``fieldreid models`` do, step by step.
* :mod:`fieldreid.export.detector_onnx` — YOLOv5 / ultralytics checkpoint -> detector ONNX (+ its preprocessing).
* :mod:`fieldreid.export.embedder_onnx` — fieldreid embedder checkpoint -> embedder ONNX, parity-gated.
* :mod:`fieldreid.export.quantize` — INT8 QDQ ONNX calibrated on real crops, and its accuracy gate.
* :mod:`fieldreid.export.profiles` — export profiles (``default_profiles/*.toml`` ship in the package).

TensorRT plans are built by :mod:`fieldreid.engines.tensorrt`. Nothing is imported here, so
``import fieldreid.export.profiles`` stays light.
"""
