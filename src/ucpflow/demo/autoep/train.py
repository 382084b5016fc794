"""Train a tiny Hugging Face MoE causal LM with DeepSpeed AutoEP expert parallelism x ZeRO-1/2/3 data parallelism.

    deepspeed --num_gpus 2 --master_port PORT train.py --ep 2 --zero-stage 1 --save-dir DIR
    deepspeed --num_gpus 2 --master_port PORT train.py --ep 1 --zero-stage 1 \\
        --resume-universal DIR --steps 2 --losses-out FILE

AutoEP (`expert_parallel` in the DeepSpeed config, preset `mixtral` or `qwen3_moe`) replaces each
sparse MoE block by one that holds num_experts / ep of the experts per rank as fused w1/w2/w3
tensors, and saves every expert in a file of its own beside the ZeRO files. All ranks form one
ZeRO data-parallel group; rank r trains on its share r of each step's global batch, so a resume
continues the data stream of the original run on any expert-parallel degree.
"""

import argparse
import os
from pathlib import Path

from ucpflow.demo.launcher import exit_finished_rank
from ucpflow.demo.steps import optimizer_step, write_losses

PRESETS = {"mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout = parser.add_argument_group("layout (the launcher starts --procs processes)")
    layout.add_argument("--procs", type=int, default=2, help="processes: the ZeRO data-parallel degree")
    layout.add_argument("--ep", type=int, default=2, help="AutoEP degree (expert_parallel.autoep_size)")

    model = parser.add_argument_group("model (random weights from a transformers config)")
    model.add_argument("--model", choices=sorted(PRESETS), default="mixtral")
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--hidden", type=int, default=32)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--kv-heads", type=int, default=2)
    model.add_argument("--ffn-hidden", type=int, default=64, help="intermediate size of each expert")
    model.add_argument("--experts", type=int, default=4)
    model.add_argument("--top-k", type=int, default=2)
    model.add_argument("--vocab", type=int, default=64)
    model.add_argument("--seq", type=int, default=8, help="tokens per sequence")

    training = parser.add_argument_group("training")
    training.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=1)
    training.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    training.add_argument("--steps", type=int, default=2, help="optimizer steps (after the load, when resuming)")
    training.add_argument("--global-batch", type=int, default=4, help="sequences per step, over all ranks")
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
    if args.global_batch % args.procs:
        raise ValueError(f"the global batch {args.global_batch} is not a multiple of {args.procs} processes")
    if args.procs % args.ep or args.experts % args.ep:
        raise ValueError(f"ep {args.ep} must divide the processes ({args.procs}) and the experts ({args.experts})")
    if args.heads % args.kv_heads or args.hidden % args.heads:
        raise ValueError(f"hidden {args.hidden}, heads {args.heads} and kv heads {args.kv_heads} do not divide")


def deepspeed_config(args) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.global_batch // args.procs,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": args.lr, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "expert_parallel": {"enabled": True, "autoep_size": args.ep, "preset_model": PRESETS[args.model],
                            "use_grouped_mm": False},
        "checkpoint": {"load_universal": args.resume_universal is not None},
        "steps_per_print": 1_000_000,
    }


def causal_lm(args):
    """The model with random weights (seeded by the caller), the same on every rank."""
    import transformers

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=args.seq, num_experts_per_tok=args.top_k, output_router_logits=False,
                  tie_word_embeddings=False, use_cache=False, attn_implementation="eager")
    if args.model == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=args.ffn_hidden, num_local_experts=args.experts, **common)
        return transformers.MixtralForCausalLM(config)
    config = transformers.Qwen3MoeConfig(intermediate_size=args.ffn_hidden, moe_intermediate_size=args.ffn_hidden,
                                         num_experts=args.experts, head_dim=args.hidden // args.heads, **common)
    return transformers.Qwen3MoeForCausalLM(config)


def accept_registry_defaults():
    """Let DeepSpeed 0.19.8's AutoEP presets call `_CAN_RECORD_REGISTRY.get(class_name, default)`.

    transformers 5.24 turned that registry into a dict whose `get` takes a model instance instead,
    so `deepspeed.initialize` fails while retargeting the output recorders. A string key with a
    default is answered as a plain dict would; any other call is transformers' own.
    """
    from transformers.utils import output_capturing

    registry_class = type(output_capturing._CAN_RECORD_REGISTRY)
    model_get = registry_class.get

    def get(self, key, *default):
        if isinstance(key, str):
            return dict.get(self, key, *default)
        return model_get(self, key)

    registry_class.get = get


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

    from ucpflow.demo.launcher import remove_shm_allreduce_segments

    # One thread per rank keeps the floating-point reduction order, hence the losses, fixed.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    accept_registry_defaults()
    deepspeed.init_distributed(dist_backend="gloo")
    if dist.get_world_size() != args.procs:
        raise SystemExit(f"--procs {args.procs} != {dist.get_world_size()} processes")
    dist.barrier()
    remove_shm_allreduce_segments(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], [dist.get_rank()])

    model = causal_lm(args)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(args))
    if args.resume_universal is not None:
        load_path, _ = engine.load_checkpoint(str(args.resume_universal))
        if load_path is None:
            raise SystemExit(f"DeepSpeed loaded nothing from {args.resume_universal}")

    rank = dist.get_rank()
    micro_batch = args.global_batch // args.procs
    first_step = engine.global_steps
    losses = []
    for _ in range(args.steps):
        tokens = global_batch_tokens(engine.global_steps, args)[rank * micro_batch:(rank + 1) * micro_batch]
        losses.append(optimizer_step(engine, engine(input_ids=tokens, labels=tokens).loss))
    if rank == 0:
        print(f"optimizer {type(engine.optimizer).__name__}, steps {first_step + 1}..{engine.global_steps}, "
              f"losses {losses}", flush=True)

    if args.save_dir is not None:
        engine.save_checkpoint(str(args.save_dir))
    write_losses(args.losses_out, losses)
    dist.barrier()
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
