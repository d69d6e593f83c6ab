#!/usr/bin/env python3
"""Writes the transformers fixtures tests/interop.rs imports (no Python needed by the tests).

    python scripts/make-interop-fixtures.py [--out tests/fixtures]

Makes two tiny random models with transformers' own classes and save_pretrained, each with a
byte-level BPE tokenizer trained by `tokenizers` on the text below, and the logits transformers
computes in float64 for a fixed prompt (9 significant digits):

- hf-gpt2-tiny/: GPT2LMHeadModel, 2 layers, 4 heads of 12 (n_embd 48), n_inner 100 (not 4·48),
  context 40, tied head, every weight, bias and layer-norm parameter random (so a transpose or a
  dropped bias shows).
- hf-llama-tiny/: LlamaForCausalLM with grouped-query attention (4 query heads, 2 key/value
  heads of 12), intermediate 80, rms_norm_eps 1e-6, rope_theta 500 (not the default), separate
  head, saved in shards of ~60 KB with model.safetensors.index.json.

expected.json holds {"text", "tokens", "logits"}: one row of vocab_size logits per token.
"""
import argparse
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

TEXT = """The kiln was hot by noon, and the potter set the bowls along the shelf in rows.
Each bowl had a name scratched on its foot: one for the miller, two for the baker's
daughters, and a tall jar for the man who kept bees behind the church. "Not yet," she said,
when the boy reached for the door. "Let them cool, or they crack." He waited, counting
the swallows on the wire: seven, eight, nine... The smoke went up straight into a sky
without wind, 1234567890 times thinner than it was at dawn. Naive cafe owners -- the old
ones -- still paid in eggs and honey, and nobody minded at all.
"""
PROMPT = "The potter said: \"Let them cool,\" 9 times."
VOCAB = 300


def tokenizer():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tk.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def randomise(model, seed):
    """Every parameter random: matrices ~N(0, 0.15²), norm gains 1 ± 0.2, biases ±0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "ln" in name or "norm" in name:
                p.copy_(1 + 0.2 * r if name.endswith("weight") else 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(0.15 * r)


def save(model, tok, out, **kw):
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, **kw)
    tok.save_pretrained(out)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    model.eval()  # a model built from a config starts in training mode, with dropout on
    with torch.no_grad():
        logits = model.double()(torch.tensor([ids])).logits[0]
    json.dump({"text": PROMPT, "tokens": ids, "logits": [[float(f"{x:.9g}") for x in row] for row in logits]},
              open(os.path.join(out, "expected.json"), "w"))
    print(f"{out}: {len(ids)} tokens, vocab {logits.shape[1]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    a = ap.parse_args()
    tok = tokenizer()
    n = len(tok)
    assert n == VOCAB, n
    eos = tok.convert_tokens_to_ids("<|endoftext|>")

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=n, n_positions=40, n_embd=48, n_layer=2, n_head=4, n_inner=100,
                                      activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                      bos_token_id=eos, eos_token_id=eos))
    randomise(gpt2, 1)
    save(gpt2, tok, os.path.join(a.out, "hf-gpt2-tiny"))

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=n, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
                                         rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False,
                                         bos_token_id=eos, eos_token_id=eos))
    randomise(llama, 2)
    save(llama, tok, os.path.join(a.out, "hf-llama-tiny"), max_shard_size="60KB")


if __name__ == "__main__":
    main()
