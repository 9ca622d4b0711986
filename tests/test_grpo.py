"""Training with TRL's GRPOTrainer on a 4-bit model: no hacks, one process or two."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import KERNELS_MISSING, KERNELS_RUN, needs_bnb

pytest.importorskip("trl")
pytest.importorskip("datasets")

import grpo_setup as G  # noqa: E402
from tinylora_kernels import (TinyLoRACallback, TinyLoRAGlobalParams, TinyLoRALinear,  # noqa: E402
                              apply_tiny_lora, load_tiny_lora, router, set_backend)

pytestmark = needs_bnb


def _adapted(seed=0, **model_kwargs):
    model = G.model(**model_kwargs)
    gp = TinyLoRAGlobalParams(u_dim=13, dtype=torch.float32)
    torch.manual_seed(seed)
    apply_tiny_lora(model, gp, progress=False)
    return model, gp


def _count_rollout_calls(model):
    """Counts TinyLoRALinear calls made without autograd (the rollouts) and the plans they ran."""
    seen = {"calls": 0, "paths": set()}

    def hook(module, args):
        if not torch.is_grad_enabled():
            seen["calls"] += 1
            seen["paths"].add(router.explain(module, args[0]).path)

    for m in model.modules():
        if isinstance(m, TinyLoRALinear):
            m.register_forward_pre_hook(hook)
    return seen


def test_grpo_trains_v_only_and_moves_the_reward(tmp_path):
    from trl import GRPOTrainer

    tok = G.tokenizer()
    model, gp = _adapted()
    target = G.steerable_token(model, tok, gp.global_v)
    p_before = G.target_probability(model, tok, target)
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items()
              if n != "tiny_lora_params.global_v"}
    rollouts = _count_rollout_calls(model)
    callback = TinyLoRACallback(seed=0, model_id="tiny-qwen2")
    trainer = GRPOTrainer(model=model, reward_funcs=G.counting_reward(target),
                          args=G.config(tmp_path, 40, save_strategy="steps", save_steps=20),
                          train_dataset=G.dataset(), processing_class=tok, callbacks=[callback])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 40
    assert all(torch.isfinite(torch.tensor([h["loss"], h["grad_norm"]])).all() for h in logs)
    assert any(h["grad_norm"] > 0 for h in logs)
    # every other tensor bit-identical; v moved
    for name, t in model.state_dict().items():
        if name != "tiny_lora_params.global_v":
            assert torch.equal(t, frozen[name]), name
    assert gp.global_v.abs().sum() > 0
    # the rollouts ran through our layers (14 layers x every generated token)
    assert rollouts["calls"] >= 14 * 8 * 40 and rollouts["paths"] == {"torch"}
    # the reward rose. 40 steps x 32 completions of 8 tokens: the rewarded token starts near
    # 1/26 and the sampling noise of a 20-step mean is ~0.03; with these seeds the mean goes
    # from ~0.35 to ~0.43, and the probability of the token from 0.039 to 0.054. Required: the
    # second half above the first, and the probability up by at least 15 %.
    rewards = [h["reward"] for h in logs]
    assert sum(rewards[20:]) > sum(rewards[:20]), rewards
    p_after = G.target_probability(model, tok, target)
    assert p_after > 1.15 * p_before, (p_before, p_after)

    # tiny_lora_v.pt at each save and at the end, restorable onto a fresh model
    written = [os.path.relpath(p, tmp_path) for p in callback.written]
    assert written == [os.path.join("checkpoint-20", "tiny_lora_v.pt"),
                       os.path.join("checkpoint-40", "tiny_lora_v.pt"), "tiny_lora_v.pt"]
    restored = load_tiny_lora(G.model(), tmp_path / "tiny_lora_v.pt")
    ids = tok(G.prompts(4), return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.skipif(not KERNELS_RUN, reason=KERNELS_MISSING)
def test_grpo_with_the_kernels_forced(tmp_path):
    from trl import GRPOTrainer

    tok = G.tokenizer()
    model, gp = _adapted()
    set_backend(model, "triton")
    rollouts = _count_rollout_calls(model)
    trainer = GRPOTrainer(model=model, reward_funcs=G.counting_reward(3),
                          args=G.config(tmp_path, 2, per_device_train_batch_size=8,
                                        max_completion_length=4),
                          train_dataset=G.dataset(), processing_class=tok)
    trainer.train()
    assert rollouts["calls"] > 0 and rollouts["paths"] == {"fused"}
    assert gp.global_v.abs().sum() > 0


def test_grpo_with_gradient_checkpointing_and_kbit_preparation(tmp_path):
    from peft import prepare_model_for_kbit_training
    from trl import GRPOTrainer

    tok = G.tokenizer()
    model = prepare_model_for_kbit_training(G.model())      # before apply_tiny_lora
    gp = TinyLoRAGlobalParams(u_dim=13, dtype=torch.float32)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["tiny_lora_params.global_v"]
    trainer = GRPOTrainer(model=model, reward_funcs=G.counting_reward(3),
                          args=G.config(tmp_path, 3, per_device_train_batch_size=8,
                                        gradient_checkpointing=True),
                          train_dataset=G.dataset(), processing_class=tok)
    trainer.train()
    assert model.is_gradient_checkpointing
    assert gp.global_v.abs().sum() > 0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history
               if "loss" in h)


def test_bf16_quant_storage_reads_as_nf4():
    """QLoRA-FSDP's storage (bnb_4bit_quant_storage=torch.bfloat16): the same bytes, reinterpreted;
    the adapted model computes what the uint8-stored one does."""
    tok = G.tokenizer()
    ids = tok(G.prompts(4), return_tensors="pt").input_ids
    outs = []
    for storage in (torch.uint8, torch.bfloat16):
        model, gp = _adapted(quant_storage=storage)
        with torch.no_grad():
            gp.global_v.fill_(0.2)
            outs.append(model(ids).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_two_processes_keep_v_identical_and_rank0_writes(tmp_path):
    pytest.importorskip("accelerate")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__)),
         os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    worker = os.path.join(os.path.dirname(__file__), "grpo_worker.py")
    proc = subprocess.run(
        # accelerate's --cpu launcher starts one process unless MPI is set up; its multi-process
        # launcher (torch.distributed.run) starts two, which talk over gloo on a CPU
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", "29517", worker, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    v = {rank: torch.load(tmp_path / f"v-rank{rank}.pt") for rank in (0, 1)}
    assert len(v[0]) == len(v[1]) == 3                       # v after every step, per rank
    for a, b in zip(v[0], v[1]):
        assert torch.equal(a, b)
    assert not torch.equal(v[0][0], v[0][-1])
    written = sorted(p.name for p in tmp_path.rglob("tiny_lora_v.pt"))
    assert written == ["tiny_lora_v.pt"]
    assert (tmp_path / "writers.txt").read_text().split() == ["0"]
