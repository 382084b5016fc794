"""Load a resharded demo-GPT checkpoint with DeepSpeed's own `load_checkpoint` (no universal loading) at the
target's degree, stage and precision, and dump every state that training resumes from to one file:

    deepspeed --num_gpus M reshard_check.py --load-dir DIR --dump FILE --zero-stage S --dtype bf16 ...

The dump (rank 0, torch.save) holds per trainable parameter its full fp32 master weight and Adam moments
(`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`), every parameter's full training-precision
weight, the optimizer's step values and param groups, the engine's global/skipped steps and the LR, and the
losses of `--steps` more training steps, so that one launch checks everything of one resharded folder.
"""

import argparse
import os
import sys
from pathlib import Path

if not __package__:  # run as a script on each rank: import the ucpflow this file belongs to
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ucpflow.demo.launcher import (
    exit_finished_rank,
    options_to_argv,
    parse_options,
    remove_shm_allreduce_segments,
    run_deepspeed,
)
from ucpflow.demo.steps import optimizer_step
from ucpflow.demo.train import add_model_arguments, add_training_arguments

CHECK_SCRIPT = Path(__file__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-dir", type=Path, help="checkpoint root with a `latest` file")
    parser.add_argument("--dump", type=Path, help="file for the loaded states (rank 0)")
    parser.add_argument("--hf-model", action=argparse.BooleanOptionalAction, default=False,
                        help="load a transformers causal LM built from LOAD_DIR/config.json (the HF Trainer's layout) "
                             "instead of the demo GPT")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    add_model_arguments(parser)
    add_training_arguments(parser)
    parser.set_defaults(steps=1)
    return parser


def check(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from ucpflow.demo.gpt import GPT, GPTConfig, freeze_parameters, synthetic_batch
    from ucpflow.demo.train import deepspeed_config, model_parameters

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    deepspeed.init_distributed(dist_backend="gloo")
    dist.barrier()
    remove_shm_allreduce_segments(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], [dist.get_rank()])
    # A different seed than the saved run's: every value checked must come from the checkpoint.
    torch.manual_seed(args.seed + 1000)
    if args.hf_model:
        import transformers

        config = transformers.AutoConfig.from_pretrained(args.load_dir)
        args.vocab, args.seq_len = config.vocab_size, min(config.max_position_embeddings, args.seq_len)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        config = GPTConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab,
                           seq_len=args.seq_len)
        model = GPT(config, seed=args.seed + 1000)
    freeze_parameters(model, args.freeze)
    args.resume_universal = None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model_parameters(model, args.decay_groups),
                                           config=deepspeed_config(args))
    load_path, client_state = engine.load_checkpoint(str(args.load_dir))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed loaded nothing from {args.load_dir}")
    dump = loaded_states(engine)
    dump["client_state"] = sorted(client_state)

    rank, world_size = dist.get_rank(), dist.get_world_size()
    losses = []
    for _ in range(args.steps):
        if args.hf_model:
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + engine.global_steps)
            batch = torch.randint(args.vocab, (args.micro_batch * world_size, args.seq_len), generator=generator)
            tokens = batch[rank * args.micro_batch:(rank + 1) * args.micro_batch].to(engine.device)
            loss = engine(input_ids=tokens, labels=tokens).loss
        else:
            batch = synthetic_batch(engine.global_steps, args.micro_batch * world_size, config, seed=args.seed)
            tokens = batch[rank * args.micro_batch:(rank + 1) * args.micro_batch].to(engine.device)
            loss = engine(tokens[:, :-1], tokens[:, 1:])
        losses.append(optimizer_step(engine, loss))
    dump["losses"] = losses
    if rank == 0:
        args.dump.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dump, args.dump)
    dist.barrier()
    dist.destroy_process_group()


def loaded_states(engine) -> dict:
    """Every state training resumes from, of a DeepSpeed engine that has just loaded a checkpoint: per
    trainable parameter its full fp32 master weight and Adam moments, every parameter's full
    training-precision weight, the optimizer's step values and param groups, the engine's steps and LR."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # BF16_Optimizer and ZeRO-1/2 link their state views lazily.
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    dump = {"params": {}, "weights": {}}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            dump["params"][name] = {
                "fp32": safe_get_full_fp32_param(param).detach().cpu().clone(),
                "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").detach().cpu().clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").detach().cpu().clone(),
            }
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        for name, param in engine.module.named_parameters():
            dump["weights"][name] = param.detach().cpu().clone()
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    dump["steps"] = sorted({float(state["step"]) for state in base.state.values() if "step" in state})
    dump["param_groups"] = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
    dump["engine"] = {"global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
                      "global_samples": engine.global_samples, "lr": engine.get_lr()}
    return dump


def load_and_dump(load_dir, dump, *, num_procs: int, timeout: float = 600, **options) -> Path:
    """Launch the check on `num_procs` CPU processes; `options` are the demo trainer's (zero_stage=, dtype=,
    freeze=, model sizes). Returns `dump`; the launcher's output goes to `dump` with the suffix .log."""
    parsed = parse_options(build_parser(), options, reserved=("load_dir", "dump"), what="the reshard check",
                           load_dir=load_dir, dump=dump)
    dump = Path(dump)
    run_deepspeed(CHECK_SCRIPT, options_to_argv(vars(parsed)), num_procs=num_procs, log_path=dump.with_suffix(".log"),
                  timeout=timeout, what=f"loading the resharded checkpoint in {load_dir}")
    return dump


if __name__ == "__main__":
    check(build_parser().parse_args())
    exit_finished_rank()
