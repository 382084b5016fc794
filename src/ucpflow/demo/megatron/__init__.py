"""A Megatron-DeepSpeed-shaped toy GPT (GPTModelPipe names, tensor x pipeline x data parallelism),
trained by real DeepSpeed on CPU to build checkpoints for the converter's tests.

Importing this package is cheap: torch and DeepSpeed are imported only by the training processes.
`launch` runs them; `train` is the script each rank runs.
"""
