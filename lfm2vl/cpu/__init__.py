"""The CPU layer: everything `optimize_for_cpu` (speed.py) installs on a loaded model.

    speed.py    optimize_for_cpu: swaps the language model's and vision tower's modules for fast subclasses
    vision.py   the vision tower's and projector's fast subclasses (oneDNN fused linears, native attention, cached
                position grids)
    quant.py    FastLinear / Int8Linear / Int4Linear: native GEMV linears, weight-only int8 / int4
    lowmem.py   the low-memory mode: idle mapped weights dropped around the vision pass
    memory.py   resident-memory helpers (dropping mapped pages, heap policy and trimming, library pages)
    dropout.py  FastDropout for CPU training (LoRA's dropout): a native pass, the mask regenerated from a seed
    kernels/    the native kernels (C++ built at first use, called through ctypes); imports nothing from lfm2vl
"""
