"""Embedding stage: crops -> L2-normalised vectors.

``fieldreid.embed.runtime`` (numpy + OpenCV + an engine) is what field devices import. ``model``,
``lite_weights`` and ``export`` need torch/timm (the ``train`` extra) and are imported only by lab code.
Nothing is imported here, so ``import fieldreid.embed`` stays light.
"""
