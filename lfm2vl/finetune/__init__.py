"""Fine-tuning: LoRA (PEFT's adapter format) and full SFT on image conversations.

    summary = lfm2vl.finetune(model="LiquidAI/LFM2-VL-450M", data="train.jsonl", output="runs/a")

`lfm2vl.finetune` is this package, and calling it runs `run` (loop.py): the module's class is swapped for a
callable one so that the package and the function share the name users expect.
"""
from __future__ import annotations

import sys
import types


def run(**options):
    """Train with `options` (finetune/options.py names each one and its default) and return the run's summary."""
    from .loop import finetune

    return finetune(**options)


class _CallableModule(types.ModuleType):
    def __call__(self, **options):
        return run(**options)


sys.modules[__name__].__class__ = _CallableModule
