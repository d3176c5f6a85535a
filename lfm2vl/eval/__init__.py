"""Evaluation: benchmark files in VLMEvalKit's TSV layout, prompts as VLMEvalKit builds them for LFM2-VL, and
scorers implemented from the published rules (multiple choice, MMBench circular, POPE, OCRBench, MM-IFEval's
rule-checked constraints)."""
