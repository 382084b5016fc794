"""Train the Megatron-shaped toy GPT with tensor, pipeline and data parallelism on CPU ranks.

    deepspeed --num_gpus 8 --master_port PORT train.py --tp 2 --pp 2 --dp 2 --save-dir DIR [options]
    deepspeed --num_gpus 2 --master_port PORT train.py --tp 1 --pp 2 --dp 1 \\
        --resume-universal DIR --steps 3 --losses-out FILE
    deepspeed --num_gpus 8 --master_port PORT train.py --tp 2 --pp 2 --dp 2 \\
        --resume-checkpoint DIR --steps 3 --losses-out FILE

The global batch of step s depends only on (seed, s) and its size, and each data-parallel rank
trains on its own micro-batches of it, so a resume continues the data stream of the original run on
any layout, and the loss of a step (mean over the global batch) can be compared across layouts.
The checkpoint is saved the way Megatron-DeepSpeed saves one: tag global_step{N}, with
`universal_checkpoint_info`, `iteration`, `checkpoint_version` and `args` in the client state.
"""

import argparse
import itertools
import os
from pathlib import Path

from ucpflow.demo.launcher import exit_finished_rank
from ucpflow.demo.steps import write_losses
from ucpflow.demo.megatron.config import QKV_LAYOUTS, GPTConfig
from ucpflow.errors import UcpflowError

MODEL_OPTIONS = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq", "make_vocab_size_divisible_by",
                 "qkv_layout", "swiglu", "llama", "partial_output_scale")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout = parser.add_argument_group("layout (the launcher must start tp * pp * dp processes)")
    for name in ("tp", "pp", "dp"):
        layout.add_argument(f"--{name}", type=int, default=1)

    model = parser.add_argument_group("model")
    defaults = GPTConfig()
    for name in ("layers", "hidden", "heads", "vocab", "seq", "make_vocab_size_divisible_by"):
        model.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    model.add_argument("--kv-heads", type=int, default=0, help="key/value heads for grouped-query attention "
                       "(0: as many as --heads); not a multiple of --tp gives ranks uneven head counts")
    model.add_argument("--ffn-hidden", type=int, default=0, help="MLP size (0: 4 * hidden)")
    model.add_argument("--qkv-layout", choices=QKV_LAYOUTS, default=defaults.qkv_layout,
                       help="interleaved: Megatron's rows, [q...; k; v] per key/value head; "
                       "blocks: [Q; K; V] sub-parameters")
    model.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=False,
                       help="mlp.dense_h_to_4h as [gate; up] sub-parameters")
    model.add_argument("--llama", action=argparse.BooleanOptionalAction, default=False,
                       help="Llama-family blocks: RMSNorm, rotary positions, untied output layer, no linear biases")
    model.add_argument("--partial-output-scale", action=argparse.BooleanOptionalAction, default=False,
                       help="a per-rank scalar on each MLP's partial output, averaged by the converter")

    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=4, help="optimizer steps (after the load, when resuming)")
    training.add_argument("--global-batch", type=int, default=8,
                          help="sequences per step, over all data-parallel ranks")
    training.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    training.add_argument("--lr", type=float, default=1e-3)
    training.add_argument("--clip-grad", type=float, default=1.0)
    training.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data")
    training.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    training.add_argument("--zero-stage", type=int, choices=(0, 1), default=1,
                          help="ds_to_universal needs 1 (it refuses a ZeRO-0 checkpoint), and so does a "
                          "universal resume; pipeline parallelism allows no more")
    training.add_argument("--grad-accum-dtype", choices=("fp32", "bf16"),
                          help="bf16 only; default fp32 with ZeRO-1 and bf16 with ZeRO-0, which both give "
                          "DeepSpeed's BF16_Optimizer; bf16 with ZeRO-1 gives the ZeRO-1 optimizer")

    checkpoint = parser.add_argument_group("checkpoint")
    checkpoint.add_argument("--save-dir", type=Path, help="checkpoint root to save into after training")
    checkpoint.add_argument("--universal-info", action=argparse.BooleanOptionalAction, default=True,
                            help="save universal_checkpoint_info, which ds_to_universal requires")
    checkpoint.add_argument("--qkv-sub-params", action=argparse.BooleanOptionalAction, default=True,
                            help="describe a blocks QKV as [Q; K; V] sub-parameters in universal_checkpoint_info "
                            "(Megatron-DeepSpeed does not)")
    checkpoint.add_argument("--unmatched-pattern", action="append", default=[], metavar="REGEX",
                            help="add a TP-replicated pattern that matches no parameter (repeatable)")
    checkpoint.add_argument("--omit-tp-patterns-at-tp1", action=argparse.BooleanOptionalAction, default=False,
                            help="as Megatron-DeepSpeed, save no TP-replicated and row-parallel patterns when "
                            "--tp is 1; DeepSpeed then restores row-parallel weights wrongly on tp > 1")
    resume = checkpoint.add_mutually_exclusive_group()
    resume.add_argument("--resume-universal", type=Path, metavar="CKPT_ROOT",
                        help="first load the universal checkpoint named by CKPT_ROOT/latest_universal")
    resume.add_argument("--resume-checkpoint", type=Path, metavar="CKPT_ROOT",
                        help="first load the DeepSpeed checkpoint named by CKPT_ROOT/latest (same layout)")
    checkpoint.add_argument("--losses-out", type=Path, help="JSON list of the loss of every step (written by rank 0)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def gpt_config(args) -> GPTConfig:
    return GPTConfig(tp=args.tp, **{name: getattr(args, name) for name in MODEL_OPTIONS})


def check_args(args):
    """Raise UcpflowError, before any process starts, for options that cannot work together."""
    if args.global_batch % (args.micro_batch * args.dp):
        raise UcpflowError(f"The global batch {args.global_batch} is not a multiple of the micro-batch "
                           f"{args.micro_batch} times dp {args.dp}.")
    if args.dtype == "fp32" and args.grad_accum_dtype:
        raise UcpflowError("A gradient accumulation dtype applies to bf16 training only.")
    gpt_config(args)


def grad_accum_dtype(args):
    if args.dtype == "fp32":
        return None
    return args.grad_accum_dtype or ("fp32" if args.zero_stage == 1 else "bf16")


def deepspeed_config(args) -> dict:
    config = {
        "train_batch_size": args.global_batch,
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.global_batch // (args.micro_batch * args.dp),
        "optimizer": {"type": "Adam", "params": {"lr": args.lr, "torch_adam": True}},
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "checkpoint": {"load_universal": args.resume_universal is not None},
        "steps_per_print": 1_000_000,
    }
    if grad_accum_dtype(args):
        config["data_types"] = {"grad_accum_dtype": grad_accum_dtype(args)}
    return config


def global_batch_tokens(step: int, args):
    """The global batch of a step: arithmetic sequences modulo the vocabulary, with random start and stride."""
    import torch

    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(args.vocab, (args.global_batch, 1), generator=generator)
    strides = torch.randint(1, 8, (args.global_batch, 1), generator=generator)
    return (starts + strides * torch.arange(args.seq + 1)) % args.vocab


def micro_batches(first_step: int, dp_rank: int, args):
    """(inputs, labels) for each micro-batch of this data-parallel rank, from step `first_step` on."""
    accumulation = args.global_batch // (args.micro_batch * args.dp)
    for step in itertools.count(first_step):
        batch = global_batch_tokens(step, args)
        for micro in range(accumulation):
            first = (dp_rank * accumulation + micro) * args.micro_batch
            tokens = batch[first:first + args.micro_batch]
            yield tokens[:, :-1], tokens[:, 1:]


def megatron_args(args) -> argparse.Namespace:
    """The subset of Megatron's `args` that checkpoint readers look at, under Megatron's names.

    As the Megatron-DeepSpeed code that computes attention the fixture's way would save them: per-group
    QKV ("interleaved") is the code before PR #441, which has --ds-sequence-parallel-size but not the
    FPDT options #441 added; per-slice [Q; K; V] ("blocks") is #441 and later, which has both.
    """
    config = gpt_config(args)
    code_version = {"ds_sequence_parallel_size": 1}
    if config.qkv_layout == "blocks":
        code_version.update(ds_sequence_parallel_fpdt=False, ds_sequence_parallel_fpdt_chunk_size=65536)
    llama = {}
    if config.llama:
        llama = dict(normalization="rmsnorm", add_bias_linear=False, untie_embeddings_and_output_weights=True,
                     add_position_embedding=False, use_rotary_position_embeddings=True, rope_theta=config.rope_theta,
                     rotary_percent=1.0, position_embedding_type="rope", layernorm_epsilon=config.norm_eps,
                     kv_channels=config.head_dim)
    saved = dict(
        num_layers=config.layers, hidden_size=config.hidden, num_attention_heads=config.heads,
        num_key_value_heads=config.num_kv_heads, ffn_hidden_size=config.ffn_size, seq_length=config.seq,
        max_position_embeddings=config.seq, padded_vocab_size=config.padded_vocab,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by, swiglu=config.swiglu,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp, data_parallel_size=args.dp,
        bf16=args.dtype == "bf16", fp16=False, untie_embeddings_and_output_weights=False,
        add_position_embedding=True, normalization="layernorm", add_bias_linear=True,
        # The model's activation, norm and dropout, so exporters need not rely on Megatron's defaults.
        bias_gelu_fusion=True, openai_gelu=False, onnx_safe=False, layernorm_epsilon=1e-5,
        apply_residual_connection_post_layernorm=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=0.02, position_embedding_type="learned_absolute")
    return argparse.Namespace(**{**saved, **code_version, **llama})


def train(args):
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from ucpflow.demo.megatron.model import GPTModelPipe
    from ucpflow.demo.megatron.universal_info import universal_checkpoint_info

    # One thread per rank: the ranks share a few cores, and a fixed thread count keeps the
    # floating-point reduction order, hence the losses, the same from run to run.
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    if dist.get_world_size() != args.tp * args.pp * args.dp:
        raise SystemExit(f"tp {args.tp} * pp {args.pp} * dp {args.dp} != {dist.get_world_size()} processes")

    topology = PipeModelDataParallelTopology(num_pp=args.pp, num_mp=args.tp, num_dp=args.dp)
    model = GPTModelPipe(gpt_config(args), topology, seed=args.seed)
    engine, _, _, _ = deepspeed.initialize(model=model,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=deepspeed_config(args))
    resume_root = args.resume_universal or args.resume_checkpoint
    if resume_root is not None:
        load_path, _ = engine.load_checkpoint(str(resume_root))
        if load_path is None:
            raise SystemExit(f"DeepSpeed loaded nothing from {resume_root}")

    first_step = engine.global_steps
    data = micro_batches(first_step, engine.grid.get_data_parallel_rank(), args)
    losses = [engine.train_batch(data_iter=data).item() for _ in range(args.steps)]
    if dist.get_rank() == 0:
        print(f"optimizer {type(engine.optimizer).__name__}, steps {first_step + 1}..{engine.global_steps}, "
              f"losses {losses}", flush=True)

    if args.save_dir is not None:
        client_state = {"iteration": engine.global_steps, "checkpoint_version": 3.0,
                        "args": megatron_args(args)}
        if args.universal_info:
            client_state[UNIVERSAL_CHECKPOINT_INFO] = universal_checkpoint_info(
                model.config, args.unmatched_pattern, args.omit_tp_patterns_at_tp1, args.qkv_sub_params)
        engine.save_checkpoint(str(args.save_dir), client_state=client_state)
    write_losses(args.losses_out, losses)
    dist.barrier()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except UcpflowError as error:
        parser.error(str(error))
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    train(args)


if __name__ == "__main__":
    main()
    exit_finished_rank()
