"""One rank of a 2-process GRPO run (``accelerate launch --num_processes 2 --cpu``), for
tests/test_grpo.py: records v after every step and which ranks wrote the checkpoint."""

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

import grpo_setup as G
from tinylora_kernels import TinyLoRACallback, TinyLoRAGlobalParams, apply_tiny_lora


class RecordV(TrainerCallback):
    def __init__(self, gp):
        self.gp, self.seen = gp, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(self.gp.global_v.detach().clone())


class Writers(TinyLoRACallback):
    def _write(self, model, directory, args):
        path = super()._write(model, directory, args)
        if path is not None:
            with open(Path(args.output_dir) / "writers.txt", "a") as f:
                f.write(f"{args.process_index}\n")
        return path


def main(out):
    tok = G.tokenizer()
    model = G.model()
    gp = TinyLoRAGlobalParams(u_dim=13, dtype=torch.float32)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    record = RecordV(gp)
    trainer = GRPOTrainer(model=model, reward_funcs=G.counting_reward(3),
                          args=G.config(out, 3, per_device_train_batch_size=8),
                          train_dataset=G.dataset(), processing_class=tok,
                          callbacks=[record, Writers(seed=0, model_id="tiny-qwen2")])
    trainer.train()
    torch.save(record.seen, Path(out) / f"v-rank{trainer.args.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
