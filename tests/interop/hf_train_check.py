#!/usr/bin/env python3
"""Reference side of tests/tests/hf_model.rs: random HF LLaMA models, PEFT LoRA adapters,
losses and one SGD step computed by transformers + peft + torch (f32, CPU).

  make OUT VARIANT   write OUT/model (HF dir), OUT/adapter (PEFT, random A and B),
                     OUT/batch.json (ids/targets, -100 = ignored), OUT/ref.json (loss),
                     OUT/sgd_adapter (the adapter after one SGD step on the mean loss)
  loss MODEL ADAPTER BATCH   print {"loss": ...} of a PEFT adapter (or none) on a batch

Exit status 3 = torch/transformers/peft missing (the Rust test then skips)."""
import json
import os
import sys

try:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, PeftModel, get_peft_model
except ImportError as e:  # the Rust side prints this and skips
    print(f"missing python package: {e}", file=sys.stderr)
    sys.exit(3)

VARIANTS = {
    # GQA (2 query heads per KV head), untied embeddings, default RoPE
    "gqa": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=101, rms_norm_eps=1e-5, tie_word_embeddings=False,
                max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # tied embeddings, head_dim not hidden/heads, MHA
    "tied": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, intermediate_size=80, vocab_size=97, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # llama3 RoPE scaling with a short original context so all three frequency bands occur
    "llama3": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                   intermediate_size=112, vocab_size=113, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   max_position_embeddings=256,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch_loss(model, batch):
    ids = torch.tensor(batch["ids"])
    targets = torch.tensor(batch["targets"])
    logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="mean")


def make(out, variant):
    torch.manual_seed({"gqa": 1, "tied": 2, "llama3": 3}[variant])
    cfg = LlamaConfig(**VARIANTS[variant], bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float()
    # larger-than-init weights so every path carries signal
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    b, t = 3, 24
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    targets[0, :5] = -100          # a masked prompt
    targets[2, 17:] = -100         # padding at the end
    batch = {"ids": ids.tolist(), "targets": targets.tolist()}
    with open(os.path.join(out, "batch.json"), "w") as f:
        json.dump(batch, f)
    peft_model.eval()              # no dropout anyway (0.0)
    loss = batch_loss(peft_model, batch)
    loss.backward()
    lr = 0.5
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    opt.step()
    peft_model.save_pretrained(os.path.join(out, "sgd_adapter"))
    with open(os.path.join(out, "ref.json"), "w") as f:
        json.dump({"loss": loss.item(), "sgd_lr": lr}, f)


def loss_of(model_dir, adapter_dir, batch_path):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir != "none":
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with open(batch_path) as f:
        batch = json.load(f)
    with torch.no_grad():
        print(json.dumps({"loss": batch_loss(model, batch).item()}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "loss":
        loss_of(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
