"""LFM2-VL processor: images -> patches, conversations -> tokens (transformers' Lfm2VlProcessor, exactly)."""
from lfm2vl.processor.processor import BatchFeature, Processor
from lfm2vl.processor.tokenizer import Tokenizer
from lfm2vl.processor.tokens import unit_tokens

__all__ = ["Processor", "Tokenizer", "BatchFeature", "unit_tokens"]
