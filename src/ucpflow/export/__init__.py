"""Exports of a universal checkpoint's fp32 weights: a Megatron-LM checkpoint at chosen tensor and pipeline
degrees (`megatron`), and a transformers model folder (`hf`: of a transformers model trained with DeepSpeed,
see transformers_source, or of a GPT-2-style Megatron model, see hf).

Both read the index tables and the universal output (`zero/<param>/fp32.pt` and the copied model-states
file); a plan job decides what every output file holds, and one job writes each output file.
"""
