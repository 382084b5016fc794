"""A tiny Hugging Face mixture-of-experts causal LM (Mixtral or Qwen3-MoE) trained by real DeepSpeed on CPU
with AutoEP expert parallelism x ZeRO-1/2/3 data parallelism, to build checkpoints for the converter's tests.

Importing this package is cheap: torch and DeepSpeed are imported only by the training processes.
`launch` runs them; `train` is the script each rank runs.
"""
