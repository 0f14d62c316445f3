"""TensorRT backend: plans built from ONNX and run with CUDA (the ``trt`` extra; imported lazily).

* :mod:`fieldreid.engines.tensorrt.runner` — :class:`TensorRTEngine`, plan building, device buffers.
"""
