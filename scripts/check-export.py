#!/usr/bin/env python3
"""Compare a model exported by `kiln export --format hf` with kiln's own forward pass.

Usage:
    kiln logits --checkpoint RUN --text-file sample.txt --greedy 50 --prompt-tokens 14 --out k.json
    python scripts/check-export.py --hf EXPORTED_FOLDER --kiln k.json [--tolerance 1e-4]

Loads the folder with transformers' AutoTokenizer and AutoModelForCausalLM (no custom code),
checks that the tokenizer encodes kiln's text to kiln's ids, runs the model in float32 on those
ids, prints the largest |logit difference| against kiln's logits over every position, and
compares a greedy continuation (transformers' generate with do_sample=False) with kiln's.
Exits 1 when the ids differ, the difference exceeds the tolerance or a greedy token differs.
"""
import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="folder written by kiln export --format hf")
    ap.add_argument("--kiln", required=True, help="JSON written by kiln logits")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()

    k = json.load(open(a.kiln))
    tok = AutoTokenizer.from_pretrained(a.hf)
    ids = tok(k["text"], add_special_tokens=False)["input_ids"]
    ok = True
    if ids != k["tokens"]:
        first = next((i for i, (x, y) in enumerate(zip(ids, k["tokens"])) if x != y), min(len(ids), len(k["tokens"])))
        print(f"tokenizer: ids differ from kiln's at position {first} ({len(ids)} vs {len(k['tokens'])} ids)")
        ok = False
    else:
        print(f"tokenizer: the {len(ids)} ids equal kiln's; decode round trip: {tok.decode(ids) == k['text']}")

    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
    model.eval()
    x = torch.tensor([k["tokens"]])
    with torch.no_grad():
        logits = model(x).logits[0].double()
    ref = torch.tensor(k["logits"], dtype=torch.float64)
    diff = (logits - ref).abs()
    worst = diff.max().item()
    pos, col = divmod(diff.argmax().item(), ref.shape[1])
    print(f"logits: {ref.shape[0]} positions x {ref.shape[1]}: max |transformers - kiln| = {worst:.3e} "
          f"(position {pos}, token {col}; largest |logit| {ref.abs().max().item():.2f}); tolerance {a.tolerance:.0e}")
    ok &= worst <= a.tolerance

    if k.get("greedy"):
        n, p = len(k["greedy"]), k["prompt_tokens"]
        prompt = torch.tensor([k["tokens"][:p]])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                                 pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(prompt))
        hf = out[0, p:].tolist()
        same = sum(1 for x, y in zip(hf, k["greedy"]) if x == y)
        first = next((i for i, (x, y) in enumerate(zip(hf, k["greedy"])) if x != y), None)
        print(f"greedy: {same} of {n} tokens identical" + ("" if first is None else f"; first difference at {first}"))
        print(f"  kiln:         {tok.decode(k['greedy'])!r}")
        print(f"  transformers: {tok.decode(hf)!r}")
        ok &= hf == k["greedy"]
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
