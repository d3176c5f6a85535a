"""lfm2vl: a self-contained PyTorch engine for Liquid AI's LFM2-VL vision-language models.

    engine = lfm2vl.load("LiquidAI/LFM2-VL-450M")          # or a local folder, or "bundled" (the demo model)
    engine = lfm2vl.load()      # $LFM2VL_MODEL, else LiquidAI/LFM2-VL-450M if cached or reachable, else bundled
    engine.generate([{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                                  {"type": "text", "text": "What is in this image?"}]}])

Exports are resolved lazily so `import lfm2vl` (and the CLI's --help) stays fast.

Importing lfm2vl changes nothing in the process's environment (os.environ): programs it starts run as their users
run them, and it runs the same whether torch or lfm2vl is imported first.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "load": "lfm2vl.engine",
    "Engine": "lfm2vl.engine",
    "Processor": "lfm2vl.processor",
    "Lfm2VlConfig": "lfm2vl.config",
    "bundled_model": "lfm2vl.resolve",
}
_SUBPACKAGES = ("finetune",)  # callable packages: lfm2vl.finetune(...) runs a fine-tuning


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"lfm2vl.{name}")
    raise AttributeError(f"module 'lfm2vl' has no attribute {name!r}")


__all__ = list(_EXPORTS) + list(_SUBPACKAGES)
