"""Train the demo GPT on CPU ranks with DeepSpeed and save a checkpoint, or resume from a universal one.

    deepspeed --num_gpus 2 --master_port PORT train.py --save-dir DIR [--zero-stage 1] [--dtype bf16] ...
    deepspeed --num_gpus 3 --master_port PORT train.py --resume-universal DIR --steps 2 --losses-out FILE

The batch of step s is a function of (seed, s) and of the global batch size alone, and each rank trains
on its own slice of it, so a resume continues the very data stream of the original run whatever the
number of processes, and the loss reported per step (mean over ranks) is that of the global batch.

Resume with the --seed of the original run: DeepSpeed's universal load does not restore frozen
parameters, which therefore keep their seeded initial values (equal to the saved ones only then).
"""

import argparse
import os
from pathlib import Path

from ucpflow.demo import DEFAULT_DEMO_SPEC
from ucpflow.demo.launcher import exit_finished_rank, remove_shm_allreduce_segments
from ucpflow.demo.steps import optimizer_step, write_losses


def add_model_arguments(parser: argparse.ArgumentParser):
    for name in ("layers", "hidden", "heads", "vocab", "seq_len"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=DEFAULT_DEMO_SPEC[name])


def add_training_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=DEFAULT_DEMO_SPEC["zero_stage"])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=DEFAULT_DEMO_SPEC["dtype"])
    parser.add_argument("--steps", type=int, default=DEFAULT_DEMO_SPEC["steps"],
                        help="optimizer steps to train (after the resume, with --resume-universal)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data")
    parser.add_argument("--freeze", action="append", default=[], metavar="PATTERN",
                        help="shell-style parameter name pattern to freeze, e.g. wpe.weight (repeatable)")
    parser.add_argument("--decay-groups", action=argparse.BooleanOptionalAction, default=False,
                        help="two optimizer parameter groups, as the HF Trainer makes them: weight decay for the "
                             "matrices, none for biases and norms")
    parser.add_argument("--universal-info", action=argparse.BooleanOptionalAction, default=True,
                        help="record the universal checkpoint version that ds_to_universal requires")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-dir", type=Path, help="checkpoint root to save into after training")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="also save every N steps during training, as a training run does (global_step<N>, ...)")
    parser.add_argument("--resume-universal", type=Path, metavar="CKPT_ROOT",
                        help="load the universal checkpoint named by CKPT_ROOT/latest_universal first")
    parser.add_argument("--losses-out", type=Path, help="JSON file for the loss of every step (rank 0)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    add_model_arguments(parser)
    add_training_arguments(parser)
    return parser


def deepspeed_config(args) -> dict:
    import torch.distributed as dist

    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro_batch * dist.get_world_size(),
        "optimizer": {"type": "Adam", "params": {"lr": args.lr, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "checkpoint": {"load_universal": args.resume_universal is not None},
        "steps_per_print": 1_000_000,
    }


def model_parameters(model, decay_groups: bool):
    """The trainable parameters for deepspeed.initialize: one group, or the HF Trainer's two (decay, no decay)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not decay_groups:
        return trainable
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def train(args):
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    from ucpflow.demo.gpt import GPT, GPTConfig, freeze_parameters, synthetic_batch

    # One thread per rank: the ranks share a few cores, and a fixed thread count keeps the
    # floating-point reduction order, hence the losses, identical between runs.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    deepspeed.init_distributed(dist_backend="gloo")
    # Once every rank is past initialisation, all have mapped each other's shared-memory
    # all-reduce segments, and each can unlink its own without waiting for the end of the run.
    dist.barrier()
    remove_shm_allreduce_segments(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], [dist.get_rank()])

    config = GPTConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
                       seq_len=args.seq_len)
    model = GPT(config, seed=args.seed)
    freeze_parameters(model, args.freeze)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model_parameters(model, args.decay_groups),
                                           config=deepspeed_config(args))
    if args.resume_universal is not None:
        load_path, _ = engine.load_checkpoint(str(args.resume_universal))
        if load_path is None:
            raise RuntimeError(f"DeepSpeed loaded nothing from {args.resume_universal}")

    rank, world_size = dist.get_rank(), dist.get_world_size()
    global_batch = args.micro_batch * world_size
    losses = []
    client_state = {}
    if args.universal_info:
        client_state[UNIVERSAL_CHECKPOINT_INFO] = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    for step in range(1, args.steps + 1):
        batch = synthetic_batch(engine.global_steps, global_batch, config, seed=args.seed)
        tokens = batch[rank * args.micro_batch:(rank + 1) * args.micro_batch].to(engine.device)
        losses.append(optimizer_step(engine, engine(tokens[:, :-1], tokens[:, 1:])))
        if args.save_dir is not None and (step == args.steps or (args.save_every and step % args.save_every == 0)):
            engine.save_checkpoint(str(args.save_dir), client_state=client_state)
    write_losses(args.losses_out, losses)
    dist.barrier()
    # Left to interpreter shutdown, the gloo process group sometimes aborts the rank
    # ("terminate called without an active exception") after the checkpoint is written.
    dist.destroy_process_group()


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.save_dir is None and args.resume_universal is None:
        build_parser().error("give --save-dir to train and save, or --resume-universal to resume")
    train(args)


if __name__ == "__main__":
    main()
    exit_finished_rank()
