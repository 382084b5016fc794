"""Logits of the Megatron-shaped toy GPT that DeepSpeed trained, on one process at TP 1, with the fp32
weights of its universal checkpoint: the reference the transformers export is compared with.

    python toy_gpt_logits.py <universal folder> <GPTConfig options as JSON> <tokens as JSON> <output .pt>
        [--bf16-weights] [--qkv-slices N]

Run in a subprocess: the toy model is a DeepSpeed PipelineModule, which needs a (one-process) process group.
"""

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("universal", type=Path)
    parser.add_argument("options")
    parser.add_argument("tokens")
    parser.add_argument("output", type=Path)
    parser.add_argument("--bf16-weights", action="store_true", help="round every weight to bf16 first")
    parser.add_argument("--qkv-slices", type=int, default=0,
                        help="the universal fused QKV is the concatenation of the slices of this many tensor-parallel "
                        "ranks (a QKV saved without sub-parameters): put each rank's rows back where the model has them")
    args = parser.parse_args(argv)

    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from ucpflow.demo.megatron.config import GPTConfig
    from ucpflow.demo.megatron.model import GPTModelPipe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    config = GPTConfig(tp=1, **json.loads(args.options))
    slices = GPTConfig(tp=args.qkv_slices, **json.loads(args.options)) if args.qkv_slices else None
    model = GPTModelPipe(config, PipeModelDataParallelTopology(num_pp=1, num_mp=1, num_dp=1), seed=0).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            weight = torch.load(args.universal / "zero" / name / "fp32.pt", weights_only=False)["param"]
            if args.bf16_weights:
                weight = weight.to(torch.bfloat16).float()
            param.zero_()
            if slices is not None and "query_key_value" in name:
                param[torch.tensor([row for rank in range(slices.tp) for row in slices.qkv_rows(rank)])] = weight
                continue
            param[tuple(slice(0, size) for size in weight.shape)] = weight  # vocabulary padding stays zero
        logits = model(torch.tensor(json.loads(args.tokens)))
    torch.save(logits, args.output)


if __name__ == "__main__":
    sys.exit(main())
