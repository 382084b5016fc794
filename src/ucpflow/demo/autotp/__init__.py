"""A tiny Hugging Face causal LM (Llama, or Phi-3 with fused projections) trained by real DeepSpeed on
CPU with AutoTP tensor parallelism x ZeRO-1/2/3 data parallelism, to build checkpoints for the converter's tests.

Importing this package is cheap: torch and DeepSpeed are imported only by the training processes.
`launch` runs them; `train` is the script each rank runs.
"""
