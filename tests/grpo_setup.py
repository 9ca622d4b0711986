"""A tiny GRPO set-up for the tests (and the 2-process worker): no downloads.

A 2-layer Qwen2 with a 32-token vocabulary, saved and reloaded in 4-bit NF4 as users load theirs;
a word-level tokenizer over the same 32 ids; prompts of 4 tokens; a reward that counts one token
id in the completion. The rewarded token is the one whose log-probability v moves most (largest
gradient norm at v = 0), so that a short run can move the reward measurably.
"""

import torch

VOCAB = 32
PAD, EOS, UNK = VOCAB - 3, VOCAB - 2, VOCAB - 1


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<pad>": PAD, "<eos>": EOS, "<unk>": UNK})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def model(**kwargs):
    """The tiny 4-bit Qwen2 (fp32 compute: the interpreter and the CPU both take it)."""
    from tinylora_kernels.testing import tiny_qwen2

    kwargs.setdefault("compute_dtype", torch.float32)
    m = tiny_qwen2(quantized=True, dtype=torch.float32, vocab_size=VOCAB, **kwargs)
    for config in (m.config, m.generation_config):
        config.pad_token_id, config.eos_token_id = PAD, EOS
    return m


def prompts(n=64):
    return [" ".join(f"t{(i * 7 + j) % (VOCAB - 3)}" for j in range(4)) for i in range(n)]


def dataset(n=64):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": prompts(n)})


def target_probability(m, tok, target):
    """Geometric mean over 16 prompts of the probability of ``target`` as the first completion
    token (exp of the mean log-probability: what the policy gradient pushes up)."""
    ids = tok(prompts(16), return_tensors="pt").input_ids
    with torch.no_grad():
        return m(ids).logits[:, -1].float().log_softmax(-1)[:, target].mean().exp().item()


def steerable_token(m, tok, v):
    """The token whose first-position log-probability has the largest gradient in v."""
    ids = tok(prompts(16), return_tensors="pt").input_ids
    logp = m(ids).logits[:, -1].float().log_softmax(-1).mean(0)
    norms = [torch.autograd.grad(logp[t], v, retain_graph=True)[0].norm().item()
             for t in range(VOCAB - 3)]
    return max(range(VOCAB - 3), key=norms.__getitem__)


def counting_reward(target):
    def reward(prompts, completions, completion_ids, **kwargs):
        return [float(sum(1 for t in ids if t == target)) for ids in completion_ids]
    reward.__name__ = f"count_t{target}"
    return reward


def config(output_dir, steps, **overrides):
    from trl import GRPOConfig

    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=32, num_generations=8,
                  max_completion_length=8, max_steps=steps, learning_rate=0.1, logging_steps=1,
                  report_to="none", use_cpu=True, seed=0, beta=0.0, save_strategy="no",
                  temperature=1.0, lr_scheduler_type="constant", warmup_steps=0,
                  gradient_checkpointing=False, bf16=False)
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)
