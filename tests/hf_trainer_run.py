"""Train a tiny transformers llama with the real `transformers.Trainer` and DeepSpeed on CPU ranks:

    python hf_trainer_run.py --output-dir DIR --zero-stage 3 --max-steps 3 --save-steps 1 --freeze NAME --local_rank=0

saves DIR/checkpoint-1, -2 and -3 as the HF Trainer does (DeepSpeed's global_step2/ and latest, trainer_state.json,
scheduler.pt, rng states, training_args.bin, config.json). With --resume CKPT --dump FILE it calls
`Trainer.train(resume_from_checkpoint=CKPT)` and, once the Trainer has loaded the checkpoint, dumps every
state training resumes from (ucpflow.demo.reshard_check.loaded_states), with the losses of the steps it
then trains and the Trainer's global step before and after, to FILE.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ucpflow.demo.launcher import exit_finished_rank  # noqa: E402

# Sequences per optimizer step over all ranks, so that a run resumed at another degree trains on as before.
GLOBAL_BATCH = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3), required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--save-steps", type=int, help="save every this many steps (default: at the end only)")
    parser.add_argument("--freeze", action="append", default=[])
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--local_rank", type=int, default=0)
    return parser


def main(args) -> None:
    import torch
    import torch.distributed as dist
    import transformers

    from ucpflow.demo.reshard_check import loaded_states

    # A different seed when resuming: every value checked must come from the checkpoint.
    torch.manual_seed(1000 if args.resume else 0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    for name, param in model.named_parameters():
        if name in args.freeze:
            param.requires_grad_(False)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 256

        def __getitem__(self, index):
            tokens = torch.randint(3, config.vocab_size, (16,), generator=torch.Generator().manual_seed(index))
            return {"input_ids": tokens, "labels": tokens}

    deepspeed_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                        "zero_optimization": {"stage": args.zero_stage}, "bf16": {"enabled": "auto"},
                        "steps_per_print": 1_000_000}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    training = transformers.TrainingArguments(
        output_dir=str(args.output_dir), max_steps=args.max_steps, per_device_train_batch_size=GLOBAL_BATCH // world_size,
        learning_rate=1e-2, lr_scheduler_type="linear", bf16=True, use_cpu=True, deepspeed=deepspeed_config,
        save_strategy="no" if args.resume else "steps", save_steps=args.save_steps or args.max_steps, logging_steps=1, report_to=[],
        dataloader_num_workers=0, disable_tqdm=True)

    dump = {}

    class DumpLoadedStates(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            dump.update(loaded_states(trainer.model_wrapped), trainer_step_at_start=state.global_step)

    trainer = transformers.Trainer(model=model, args=training, train_dataset=Tokens(),
                                   callbacks=[DumpLoadedStates()] if args.dump else [])
    trainer.train(resume_from_checkpoint=str(args.resume) if args.resume else None)
    if args.dump and dist.get_rank() == 0:
        # The log history carries the source run's entries too (trainer_state.json): keep the steps trained here.
        dump["losses"] = [entry["loss"] for entry in trainer.state.log_history
                          if "loss" in entry and entry["step"] > dump["trainer_step_at_start"]]
        dump["trainer_step_at_end"] = trainer.state.global_step
        torch.save(dump, args.dump)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(build_parser().parse_args())
    exit_finished_rank()
