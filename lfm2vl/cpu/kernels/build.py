"""Building and loading the native library: the C++ sources compiled once per machine with the system
`g++ -O3 -march=native` into ~/.cache/lfm2vl/kernels/<hash>/ (the hash covers the sources, flags, compiler and CPU),
then loaded through ctypes with every entry point's signature declared. `load()` returns the library, or None
(reported once as a warning) when LFM2VL_NO_KERNELS=1, the CPU is not x86-64, or the compiler is missing or fails.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("gemv.cpp")
_SOURCES = [_SRC] + [Path(__file__).with_name(f) for f in (
    "gemv_scalar.cpp", "gemv_avx2.cpp", "gemv_vnni.cpp", "gemv_streams.cpp", "attn.cpp", "attn_many.cpp", "attn_q8.cpp",
    "prefill.cpp", "decode.cpp", "quantized.cpp", "packed.cpp", "packed_pack.cpp", "bf16_mm.cpp", "int8mm.cpp", "amx.cpp", "vnni_mm.cpp", "dropout.cpp",
    "pool.cpp")]
_HEADERS = [Path(__file__).with_name(f) for f in ("pool.h", "gemv.h", "packed.h", "decode_ops.h", "int8mm.h", "amx.h", "panels.h", "attn_q8.h")]
_FLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c++17", "-ldl"]
KIND = {torch.bfloat16: 0, torch.float32: 1, torch.int8: 2, torch.uint8: 3}  # uint8: packed int4
PACKED_BF16 = 4  # the kind of bf16 weights packed in 12 bits (packed.cpp), whose buffer is uint8 too
I4_GROUP = 32  # int4 weights: one fp16 scale per this many weights of a row (gemv.h)
DT = {torch.float32: 0, torch.bfloat16: 1}
_lib = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("LFM2VL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lfm2vl")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    # -march=native bakes the CPU in: a different CPU (or compiler) must get its own build
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _build() -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    sources = b"".join(f.read_bytes() for f in _SOURCES + _HEADERS)
    key = hashlib.sha256(sources + " ".join(_FLAGS).encode() + version.encode() + _cpu_id().encode()).hexdigest()[:16]
    out = _cache_dir() / key / "libgemv.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a temporary name, then rename: concurrent first uses never load a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    proc = subprocess.run([cxx, *_FLAGS, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {' '.join(f.name for f in _SOURCES)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def load():
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("LFM2VL_NO_KERNELS", "0") not in ("", "0"):
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"lfm2vl: native kernels unavailable, using torch ({e})", RuntimeWarning, stacklevel=3)
        return None
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lfm2vl_linear.argtypes = [i, p, p, p, p, p, i64, i64, i64, i, i, i]
    lib.lfm2vl_linear.restype = None
    lib.lfm2vl_attn_decode.argtypes = [p, p, p, p, p, p] + [i64] * 8 + [i, i]
    lib.lfm2vl_attn_decode.restype = None
    lib.lfm2vl_dequant_int8.argtypes = [p, p, p, i64, i64, i, i]
    lib.lfm2vl_dequant_int8.restype = None
    lib.lfm2vl_dequant_int4.argtypes = [p, p, p, i64, i64, i, i]
    lib.lfm2vl_dequant_int4.restype = None
    lib.lfm2vl_attn_many.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, p, p, p, p, i, i, ctypes.c_float, i]
    lib.lfm2vl_attn_many.restype = ctypes.c_int
    lib.lfm2vl_attn_int8_scores.argtypes = []
    lib.lfm2vl_attn_int8_scores.restype = ctypes.c_int
    lib.lfm2vl_swiglu_bf16.argtypes = [p, p, p, i64, i]
    lib.lfm2vl_swiglu_bf16.restype = ctypes.c_int
    lib.lfm2vl_gelu_tanh_bf16.argtypes = [p, i64, i]
    lib.lfm2vl_gelu_tanh_bf16.restype = ctypes.c_int
    lib.lfm2vl_rmsnorm_bf16.argtypes = [p, p, p, i64, i64, ctypes.c_float, i]
    lib.lfm2vl_rmsnorm_bf16.restype = ctypes.c_int
    lib.lfm2vl_layernorm_bf16.argtypes = [p, p, p, p, i64, i64, ctypes.c_float, i]
    lib.lfm2vl_layernorm_bf16.restype = ctypes.c_int
    lib.lfm2vl_short_conv_bf16.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i]
    lib.lfm2vl_short_conv_bf16.restype = ctypes.c_int
    lib.lfm2vl_quantize.argtypes = [i, p, i, p, p, i64, i64, i]
    lib.lfm2vl_quantize.restype = None
    lib.lfm2vl_decode_step.argtypes = [p, p, i64, p, p, p, p, i64, i]
    lib.lfm2vl_decode_step.restype = None
    lib.lfm2vl_dropout.argtypes = [p, p, i64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, i, i]
    lib.lfm2vl_dropout.restype = None
    lib.lfm2vl_isa.restype = ctypes.c_int
    lib.lfm2vl_cpu_isa.restype = ctypes.c_int
    lib.lfm2vl_set_isa.argtypes = [ctypes.c_int]
    lib.lfm2vl_set_streams.argtypes = [ctypes.c_int]
    lib.lfm2vl_set_prefetch.argtypes = [ctypes.c_int]
    lib.lfm2vl_read.argtypes = [p, i64, i]
    lib.lfm2vl_read.restype = ctypes.c_uint64
    lib.lfm2vl_quantizes_x.argtypes = [ctypes.c_int]
    lib.lfm2vl_quantizes_x.restype = ctypes.c_int
    lib.lfm2vl_quantize_rows.argtypes = [p, i, p, p, i64, i64, i]
    lib.lfm2vl_quantize_rows.restype = None
    lib.lfm2vl_int8_epilogue.argtypes = [p, p, p, p, p, p, i, i, i64, i64, i]
    lib.lfm2vl_int8_epilogue.restype = None
    lib.lfm2vl_swiglu_int8.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i]
    lib.lfm2vl_swiglu_int8.restype = ctypes.c_int
    lib.lfm2vl_amx_int8.restype = ctypes.c_int
    lib.lfm2vl_amx_bf16.restype = ctypes.c_int
    lib.lfm2vl_set_amx.argtypes = [ctypes.c_int]
    lib.lfm2vl_int_mm_amx.argtypes = [p, p, p, i64, i64, i64, i]
    lib.lfm2vl_int_mm_amx.restype = ctypes.c_int
    lib.lfm2vl_int8_linear_amx.argtypes = [p, p, p, p, p, p, p, i, i, i64, i64, i64, i]
    lib.lfm2vl_int8_linear_amx.restype = ctypes.c_int
    lib.lfm2vl_bf16_linear_amx.argtypes = [p, p, p, p, p, i, i, i64, i64, i64, i]
    lib.lfm2vl_bf16_linear_amx.restype = ctypes.c_int
    lib.lfm2vl_swiglu_h_bf16_amx.argtypes = [p, p, p, p, p, p, i64, i64, i64, i]
    lib.lfm2vl_swiglu_h_bf16_amx.restype = ctypes.c_int
    lib.lfm2vl_swiglu_h_amx.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i64, i]
    lib.lfm2vl_swiglu_h_amx.restype = ctypes.c_int
    lib.lfm2vl_int8_vnni.argtypes = [i64]
    lib.lfm2vl_int8_vnni.restype = ctypes.c_int
    lib.lfm2vl_int8_linear_vnni.argtypes = [p, p, p, p, p, p, p, i, i, i64, i64, i64, i]
    lib.lfm2vl_int8_linear_vnni.restype = ctypes.c_int
    lib.lfm2vl_swiglu_h_vnni.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i64, i]
    lib.lfm2vl_swiglu_h_vnni.restype = ctypes.c_int
    lib.lfm2vl_int4_to_int8.argtypes = [p, p, p, p, i64, i64, i]
    lib.lfm2vl_int4_to_int8.restype = None
    lib.lfm2vl_p12_plan.argtypes = [p, i64, i64, p, p, i]
    lib.lfm2vl_p12_plan.restype = i64
    lib.lfm2vl_p12_bytes.argtypes = [i64, i64, i64]
    lib.lfm2vl_p12_bytes.restype = i64
    lib.lfm2vl_p12_pack.argtypes = [p, i64, i64, p, p, p, i]
    lib.lfm2vl_p12_pack.restype = None
    lib.lfm2vl_p12_unpack.argtypes = [p, i64, i64, i64, i64, p, i]
    lib.lfm2vl_p12_unpack.restype = None
    lib.lfm2vl_bf16_mm.argtypes = [p, i, p, p, i64, i64, i64, i]
    lib.lfm2vl_bf16_mm.restype = i
    lib.lfm2vl_p12_fast.restype = ctypes.c_int
    _lib = lib
    return _lib
