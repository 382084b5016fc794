"""Train a tiny Hugging Face causal LM with DeepSpeed AutoTP tensor parallelism x ZeRO data parallelism.

    deepspeed --num_gpus 4 --master_port PORT train.py --tp 2 --dp 2 --zero-stage 3 --save-dir DIR
    deepspeed --num_gpus 2 --master_port PORT train.py --tp 1 --dp 2 --zero-stage 1 \\
        --resume-universal DIR --steps 2 --losses-out FILE

--model llama is sharded by the Hugging Face tp_plan of its config: q/k/v, gate and up projections
by output features, o and down projections by input features, the LM head by vocabulary rows; embeddings and norms
stay replicated. --model phi3 has fused projections, which DeepSpeed's partition_config describes
as sub-parameters: qkv_proj as [Q; K; V] of unequal sizes (grouped-query attention), gate_up_proj
as [gate; up]; each rank holds its share of every sub-parameter. Either way AutoTP records the
`universal_checkpoint_info` (with affine maps) that ds_to_universal needs itself.
The global batch of step s depends only on (seed, s) and its size; every rank of a tensor-parallel
group trains on the same micro-batch of it, each data-parallel rank on its own, so a resume
continues the data stream of the original run on any layout.
"""

import argparse
import os
from pathlib import Path

from ucpflow.demo.launcher import exit_finished_rank
from ucpflow.demo.steps import optimizer_step, write_losses


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout = parser.add_argument_group("layout (the launcher must start tp * dp processes)")
    layout.add_argument("--tp", type=int, default=2, help="AutoTP degree (tensor_parallel.autotp_size)")
    layout.add_argument("--dp", type=int, default=2, help="ZeRO data-parallel degree")

    model = parser.add_argument_group("model (random weights from a transformers config)")
    model.add_argument("--model", choices=("llama", "phi3"), default="llama")
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--hidden", type=int, default=64)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    model.add_argument("--ffn-hidden", type=int, default=96, help="MLP intermediate size")
    model.add_argument("--vocab", type=int, default=128)
    model.add_argument("--seq", type=int, default=16, help="tokens per sequence")

    training = parser.add_argument_group("training")
    training.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=1)
    training.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    training.add_argument("--steps", type=int, default=3, help="optimizer steps (after the load, when resuming)")
    training.add_argument("--global-batch", type=int, default=4, help="sequences per step, over all dp ranks")
    training.add_argument("--lr", type=float, default=1e-3)
    training.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data")

    checkpoint = parser.add_argument_group("checkpoint")
    checkpoint.add_argument("--save-dir", type=Path, help="checkpoint root to save into after training")
    checkpoint.add_argument("--resume-universal", type=Path, metavar="CKPT_ROOT",
                            help="first load the universal checkpoint named by CKPT_ROOT/latest_universal")
    checkpoint.add_argument("--losses-out", type=Path, help="JSON list of the loss of every step (written by rank 0)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def check_args(args):
    """Raise ValueError for options that cannot work together, before any process starts."""
    if args.global_batch % args.dp:
        raise ValueError(f"the global batch {args.global_batch} is not a multiple of dp {args.dp}")
    if args.heads % args.kv_heads or args.hidden % args.heads:
        raise ValueError(f"hidden {args.hidden}, heads {args.heads} and kv heads {args.kv_heads} do not divide")
    if args.tp > 1 and (args.kv_heads % args.tp or args.ffn_hidden % args.tp):
        raise ValueError(f"tp {args.tp} must divide the kv heads ({args.kv_heads}) and the MLP size ({args.ffn_hidden})")


def phi3_partition_config(args) -> dict:
    """AutoTP layer specs for Phi-3's fused projections: unequal [Q; K; V] and equal [gate; up] sub-parameters."""
    head_size = args.hidden // args.heads
    qkv_sizes = [args.hidden, args.kv_heads * head_size, args.kv_heads * head_size]
    return {
        "use_default_specs": False,
        "layer_specs": [
            {"patterns": [r".*\.self_attn\.o_proj\.weight$", r".*\.mlp\.down_proj\.weight$"],
             "partition_type": "row"},
            {"patterns": [r".*\.self_attn\.qkv_proj\.weight$"], "partition_type": "column",
             "shape": [qkv_sizes, -1], "partition_dim": 0},
            {"patterns": [r".*\.mlp\.gate_up_proj\.weight$"], "partition_type": "column",
             "shape": [2, -1], "partition_dim": 0},
            {"patterns": [r"^lm_head\.weight$"], "partition_type": "column", "gather_output": True},
        ],
    }


def deepspeed_config(args) -> dict:
    tensor_parallel = {"autotp_size": args.tp}
    if args.model == "phi3":
        tensor_parallel["partition_config"] = phi3_partition_config(args)
    # No train_batch_size: DeepSpeed would check it against micro-batch x tp x dp, although the
    # ranks of a tensor-parallel group share their micro-batch.
    return {
        "train_micro_batch_size_per_gpu": args.global_batch // args.dp,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": args.lr, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "tensor_parallel": tensor_parallel,
        "checkpoint": {"load_universal": args.resume_universal is not None},
        "steps_per_print": 1_000_000,
    }


def causal_lm(args):
    """The model with random weights (seeded by the caller), the same on every rank."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[args.model]
    config = config_class(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn_hidden,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                          attn_implementation="eager")
    return model_class(config)


def shard_phi3_attention_heads(model, tp: int):
    """Make Phi-3's attention split its sharded qkv_proj output into this rank's heads.

    Phi3Attention slices the fused projection by the head counts of the config it shares with the
    whole model, which AutoTP does not touch; each rank holds 1/tp of the query and key/value heads.
    """
    import copy

    from transformers.models.phi3.modeling_phi3 import Phi3Attention

    rank_config = copy.copy(model.config)
    rank_config.num_attention_heads //= tp
    rank_config.num_key_value_heads //= tp
    for module in model.modules():
        if isinstance(module, Phi3Attention):
            module.config = rank_config
            module.num_key_value_heads = rank_config.num_key_value_heads


def global_batch_tokens(step: int, args):
    """The global batch of a step: arithmetic sequences modulo the vocabulary, with random start and stride."""
    import torch

    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(args.vocab, (args.global_batch, 1), generator=generator)
    strides = torch.randint(1, 8, (args.global_batch, 1), generator=generator)
    return (starts + strides * torch.arange(args.seq)) % args.vocab


def train(args):
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups

    from ucpflow.demo.launcher import remove_shm_allreduce_segments

    # One thread per rank: the ranks share a few cores, and a fixed thread count keeps the
    # floating-point reduction order, hence the losses, the same from run to run.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    deepspeed.init_distributed(dist_backend="gloo")
    if dist.get_world_size() != args.tp * args.dp:
        raise SystemExit(f"tp {args.tp} * dp {args.dp} != {dist.get_world_size()} processes")
    # Once every rank is past initialisation, all have mapped each other's shared-memory
    # all-reduce segments, and each can unlink its own.
    dist.barrier()
    remove_shm_allreduce_segments(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], [dist.get_rank()])

    model = causal_lm(args)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(args))
    if args.model == "phi3" and args.tp > 1:
        shard_phi3_attention_heads(model, args.tp)
    if args.resume_universal is not None:
        load_path, _ = engine.load_checkpoint(str(args.resume_universal))
        if load_path is None:
            raise SystemExit(f"DeepSpeed loaded nothing from {args.resume_universal}")

    # DeepSpeed makes tensor- and data-parallel groups only when AutoTP is on (tp > 1).
    dp_rank = groups.get_data_parallel_rank() if args.tp > 1 else dist.get_rank()
    micro_batch = args.global_batch // args.dp
    first_step = engine.global_steps
    losses = []
    for _ in range(args.steps):
        tokens = global_batch_tokens(engine.global_steps, args)[dp_rank * micro_batch:(dp_rank + 1) * micro_batch]
        # Every rank of a tensor-parallel group has the loss of its group's micro-batch.
        losses.append(optimizer_step(engine, engine(input_ids=tokens, labels=tokens).loss))
    if dist.get_rank() == 0:
        print(f"optimizer {type(engine.optimizer).__name__}, steps {first_step + 1}..{engine.global_steps}, "
              f"losses {losses}", flush=True)

    if args.save_dir is not None:
        engine.save_checkpoint(str(args.save_dir))
    write_losses(args.losses_out, losses)
    dist.barrier()
    # Left to interpreter shutdown, the gloo process group sometimes aborts the rank after the
    # checkpoint is written.
    dist.destroy_process_group()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.save_dir is None and args.resume_universal is None:
        parser.error("give --save-dir to train and save, or --resume-universal to resume")
    try:
        check_args(args)
    except ValueError as problem:
        parser.error(str(problem))
    train(args)


if __name__ == "__main__":
    main()
    exit_finished_rank()
