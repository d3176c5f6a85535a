"""lfm2vl: a self-contained PyTorch engine for Liquid AI's LFM2-VL vision-language models.

    engine = lfm2vl.load("LiquidAI/LFM2-VL-450M")          # or a local folder
    engine.generate([{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                                  {"type": "text", "text": "What is in this image?"}]}])

Exports are resolved lazily so `import lfm2vl` (and the CLI's --help) stays fast.

OpenMP workers sleep as soon as a torch parallel region ends (OMP_WAIT_POLICY=PASSIVE, unless the environment sets
it): by default libgomp spins them for milliseconds, on the core where the native kernels' helper thread (kernels/
pool.cpp) runs next, so each native attention after a torch GEMM ran 25-50% slower (vision -7..-17% with it).
It takes effect only if torch is not imported yet: the `lfm2vl` command and `import lfm2vl` first get it.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp, which reads it once

__version__ = "0.1.0"

_EXPORTS = {
    "load": "lfm2vl.engine",
    "Engine": "lfm2vl.engine",
    "Processor": "lfm2vl.processor",
    "Lfm2VlConfig": "lfm2vl.config",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lfm2vl' has no attribute {name!r}")


__all__ = list(_EXPORTS)
