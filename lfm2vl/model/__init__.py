"""LFM2-VL model modules: text backbone, cache, vision tower, projector and the top `Lfm2VlModel`."""
from .cache import HybridCache
from .lfm2vl import Lfm2VlModel

__all__ = ["HybridCache", "Lfm2VlModel"]
