"""The inference bench's printed tables: engines side by side per scenario (with the ratios to transformers), and
each rate as a share of the machine's own ceilings."""
from __future__ import annotations


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, dict], scenarios: list[str]) -> str:
    """Rows per scenario and engine; ratios are against the transformers row of the same dtype."""
    hdr = (f"{'scenario':<12} {'engine':<20} {'tokens':>6} {'preproc s':>9} {'vision s':>8} {'prefill tok/s':>13} "
           f"{'TTFT s':>7} {'decode tok/s':>12} | {'TTFT x':>6} {'decode x':>8}")
    lines = [hdr, "-" * len(hdr)]
    base = next((r for k, r in results.items() if k.startswith("transformers") and "error" not in r), None)
    for sc in scenarios:
        for label, r in results.items():
            if "error" in r or r.get("engine") == "quality" or sc not in r.get("scenarios", {}):
                continue
            m = r["scenarios"][sc]
            b = base["scenarios"].get(sc) if base else None
            tx = m.get("ttft_x", b["ttft_s"] / m["ttft_s"] if b else None)
            dx = m.get("decode_x", m["decode_tps"] / b["decode_tps"] if b else None)
            vision = m["vision_s"] if m["vision_s"] > 0 else None
            lines.append(f"{sc:<12} {label:<20} {m['prompt_tokens']:>6} {m['preprocess_s']:>9.3f} "
                         f"{fmt(vision, '.3f'):>8} {m['prefill_tps']:>13.0f} {m['ttft_s']:>7.2f} "
                         f"{m['decode_tps']:>12.1f} | {fmt(tx):>6} {fmt(dx):>8}")
    lines.append("")
    for label, r in results.items():
        if "error" in r:
            lines.append(f"{label}: FAILED: {r['error'].splitlines()[-1] if r['error'] else '?'}")
        elif r.get("engine") == "quality":
            name = r.get("format", "int8") + ("+vision" if r.get("int8_vision") else "")
            for sc, q in r["scenarios"].items():
                feats = (f", image features cosine mean {q['feature_cosine_mean']:.4f} min {q['feature_cosine_min']:.4f}"
                         if "feature_cosine_mean" in q else "")
                lines.append(f"{name} vs bf16 {sc:<12} logit cosine mean {q['logit_cosine_mean']:.4f} min "
                             f"{q['logit_cosine_min']:.4f}, greedy agreement {q['greedy_agreement']:.3f} "
                             f"({q['positions']} positions){feats}")
        else:
            gpu = f", peak GPU memory {r['peak_gpu_mb']:.0f} MiB" if "peak_gpu_mb" in r else ""
            lines.append(f"{label:<20} load {r['load_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MiB "
                         f"(after load {r['rss_after_load_mb']:.0f} MiB){gpu}")
    return "\n".join(lines)


def shares_table(results: dict, scenarios: list[str], machine: dict | None) -> str:
    """Decode as GB/s of weights read (and % of the measured read bandwidth), prefill and vision as GFLOP/s (and %
    of the measured GEMM rate)."""
    if machine:
        rb, rg = machine["read_gbps_range"], machine["gemm_gflops_range"]
        i8 = machine.get("int8_gops")
        head = (f"machine: read bandwidth {machine['read_gbps']:.1f} GB/s ({rb[0]:.1f}-{rb[1]:.1f}), "
                f"{machine['gemm_dtype']} GEMM {machine['gemm_gflops']:.0f} GFLOP/s ({rg[0]:.0f}-{rg[1]:.0f})"
                + (f", int8 GEMM {i8:.0f} GOP/s (the % of int8 prefill / vision)" if i8 else "") + "; "
                f"{machine['threads']} threads, measured before and after each round (each share: against the "
                f"probes around its own round)")
    else:
        head = "machine not measured (not a CPU run): rates without shares"
    lines = [head, f"{'scenario':<12} {'engine':<20} {'decode GB/s':>11} {'% bw':>5} {'prefill GFLOP/s':>15} "
                   f"{'% GEMM':>6} {'vision GFLOP/s':>14} {'% GEMM':>6}"]
    for sc in scenarios:
        for label, r in results.items():
            m = r.get("scenarios", {}).get(sc) if "error" not in r else None
            if not m or "decode_gbps" not in m:
                continue
            lines.append(f"{sc:<12} {label:<20} {m['decode_gbps']:>11.1f} {fmt(m.get('decode_bw_pct'), '.0f'):>5} "
                         f"{fmt(m['prefill_gflops'], '.0f'):>15} {fmt(m.get('prefill_gemm_pct'), '.0f'):>6} "
                         f"{fmt(m['vision_gflops'], '.0f'):>14} {fmt(m.get('vision_gemm_pct'), '.0f'):>6}")
    return "\n".join(lines)
