"""A tiny transformers causal LM (Llama with grouped-query attention and an untied head, or GPT-2 with tied
embeddings) trained by real DeepSpeed on CPU (ZeRO-1/2/3, optionally AutoTP) and saved in the folder layout
of the HF Trainer: `checkpoint-N/` with config.json, generation_config.json (and tokenizer files) beside
DeepSpeed's `global_stepN/`, `latest` and `zero_to_fp32.py`.

Importing this package is cheap: torch and DeepSpeed are imported only by the training processes.
"""
