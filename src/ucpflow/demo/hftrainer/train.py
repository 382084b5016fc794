"""Train a tiny transformers causal LM with DeepSpeed and save it as the HF Trainer does.

    deepspeed --num_gpus 2 --master_port PORT train.py --model llama --zero-stage 3 --dtype bf16 --save-dir DIR

writes DIR/checkpoint-{steps}/ with config.json and generation_config.json (and, with --tokenizer, a small
word-level tokenizer's files) beside DeepSpeed's global_step{steps}/, latest and zero_to_fp32.py.
--freeze NAME keeps a parameter out of the optimizer; --tp N > 1 shards the model with AutoTP.
"""

import argparse
import os
from pathlib import Path

from ucpflow.demo.launcher import exit_finished_rank


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads of llama (grouped-query attention)")
    parser.add_argument("--ffn-hidden", type=int, default=96, help="MLP intermediate size")
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--tp", type=int, default=1, help="AutoTP degree (1: data parallelism only)")
    parser.add_argument("--dp", type=int, default=2, help="ZeRO data-parallel degree")
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=1)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--freeze", action="append", default=[], help="parameter to freeze (repeatable)")
    parser.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=False,
                        help="also save a word-level tokenizer")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step, over all dp ranks")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", type=Path, help="the HF Trainer output folder (checkpoint-N goes into it)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def trainer_folder(save_dir, steps) -> Path:
    return Path(save_dir) / f"checkpoint-{steps}"


def model_config(args):
    import transformers

    if args.model == "gpt2":
        return transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers,
                                       n_head=args.heads, n_inner=args.ffn_hidden, n_positions=args.seq,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn_hidden,
                                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                    num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def save_tokenizer(args, folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, args.vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def deepspeed_config(args) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": args.global_batch // args.dp,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": args.lr, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.dtype == "bf16"},
        "steps_per_print": 1_000_000,
    }
    if args.tp > 1:
        config["tensor_parallel"] = {"autotp_size": args.tp}
    return config


def train(args):
    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers
    from deepspeed.utils import groups

    from ucpflow.demo.autotp.train import global_batch_tokens
    from ucpflow.demo.launcher import remove_shm_allreduce_segments

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    deepspeed.init_distributed(dist_backend="gloo")
    dist.barrier()
    remove_shm_allreduce_segments(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], [dist.get_rank()])

    config = model_config(args)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    named = dict(model.named_parameters())
    for name in args.freeze:
        named[name].requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=deepspeed_config(args))
    dp_rank = groups.get_data_parallel_rank() if args.tp > 1 else dist.get_rank()
    micro_batch = args.global_batch // args.dp
    for _ in range(args.steps):
        tokens = global_batch_tokens(engine.global_steps, args)[dp_rank * micro_batch:(dp_rank + 1) * micro_batch]
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()

    folder = trainer_folder(args.save_dir, args.steps)
    engine.save_checkpoint(str(folder))
    if dist.get_rank() == 0:
        config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        if args.tokenizer:
            save_tokenizer(args, folder)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.save_dir is None:
        parser.error("give --save-dir")
    train(args)


if __name__ == "__main__":
    main()
    exit_finished_rank()
