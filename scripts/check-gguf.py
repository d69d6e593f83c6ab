#!/usr/bin/env python3
"""Read a GGUF file written by `kiln export --format gguf` back with the `gguf` package and check it.

    python scripts/check-gguf.py MODEL.gguf --type f32|f16|q8_0 [--hf EXPORTED_HF_FOLDER]

Checks, independently of kiln's code: the metadata keys llama.cpp's gpt2 and llama loaders
read; that the file holds exactly the tensors those loaders create, each with the shape
(ggml `ne` order) and type expected for --type (vectors f32; matrices f32, f16, or q8_0 where
their rows split into 32-element blocks, the position table f16); the tokenizer arrays. With
--hf (the same checkpoint exported by `kiln export --format hf`), every tensor is compared
with the one llama.cpp's own converter (convert_hf_to_gguf.py) would derive from it: GPT-2's
Conv1D weights transposed, Llama's q_proj and k_proj permuted into Meta's RoPE order with the
converter's `permute`. Exits 1 on any mismatch.
"""
import argparse
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize


def permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected(meta, vocab):
    """name -> PyTorch-order shape of every tensor llama.cpp's loader creates."""
    arch = meta["general.architecture"]
    c, n, h = meta[f"{arch}.embedding_length"], meta[f"{arch}.block_count"], meta[f"{arch}.feed_forward_length"]
    t = {"token_embd.weight": (vocab, c), "output_norm.weight": (c,)}
    if arch == "gpt2":
        t["position_embd.weight"] = (meta["gpt2.context_length"], c)
        t["output_norm.bias"] = (c,)
        for i in range(n):
            for k, s in [("attn_norm", (c,)), ("attn_qkv", (3 * c, c)), ("attn_output", (c, c)),
                         ("ffn_norm", (c,)), ("ffn_up", (h, c)), ("ffn_down", (c, h))]:
                t[f"blk.{i}.{k}.weight"] = s
                t[f"blk.{i}.{k}.bias"] = (s[0],)
    elif arch == "llama":
        heads, kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
        d = c // heads
        assert meta["llama.rope.dimension_count"] == d, "rope.dimension_count must be the head size"
        for i in range(n):
            for k, s in [("attn_norm", (c,)), ("attn_q", (heads * d, c)), ("attn_k", (kv * d, c)),
                         ("attn_v", (kv * d, c)), ("attn_output", (c, heads * d)), ("ffn_norm", (c,)),
                         ("ffn_gate", (h, c)), ("ffn_up", (h, c)), ("ffn_down", (c, h))]:
                t[f"blk.{i}.{k}.weight"] = s
    else:
        raise SystemExit(f"unexpected architecture {arch}")
    return t


def want_type(name, shape, ty):
    if len(shape) == 1 or ty == "f32":
        return Q.F32
    if ty == "q8_0" and shape[-1] % 32 == 0 and name != "position_embd.weight":
        return Q.Q8_0
    return Q.F16


def from_hf(name, meta, hf):
    """The tensor llama.cpp's converter makes for `name` from the transformers state dict."""
    arch = meta["general.architecture"]
    if arch == "gpt2":
        g = lambda k: hf.get("transformer." + k, hf.get(k))  # noqa: E731
        top = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
               "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias"}
        if name in top:
            return g(top[name])
        if name == "output.weight":
            return hf["lm_head.weight"]
        _, i, k, part = name.split(".")
        src = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
               "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}[k]
        w = g(f"h.{i}.{src}.{part}")
        return w.T if part == "weight" and "norm" not in k else w
    heads, kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return hf[top[name]]
    _, i, k, _ = name.split(".")
    p = f"model.layers.{i}."
    if k == "attn_q":
        return permute(hf[p + "self_attn.q_proj.weight"], heads, heads)
    if k == "attn_k":
        return permute(hf[p + "self_attn.k_proj.weight"], heads, kv)
    return hf[p + {"attn_norm": "input_layernorm.weight", "attn_v": "self_attn.v_proj.weight",
                   "attn_output": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
                   "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight",
                   "ffn_down": "mlp.down_proj.weight"}[k]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--type", required=True, choices=["f32", "f16", "q8_0"])
    ap.add_argument("--hf", help="the same checkpoint exported with kiln export --format hf (f32)")
    a = ap.parse_args()
    r = GGUFReader(a.gguf)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    arch = meta["general.architecture"]
    print(f"version {r.fields['GGUF.version'].contents()}, architecture {arch}, {len(r.tensors)} tensors")
    need = [f"{arch}.{k}" for k in ["context_length", "embedding_length", "block_count", "feed_forward_length",
                                    "attention.head_count"]]
    need += [f"{arch}.attention.layer_norm_epsilon"] if arch == "gpt2" else [
        "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
        "llama.rope.freq_base"]
    need += ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"]
    ok = True
    for k in need:
        if k not in meta:
            print(f"missing key {k}")
            ok = False
        elif not k.startswith("tokenizer.ggml.t") and k != "tokenizer.ggml.merges":
            print(f"  {k} = {meta[k]}")
    vocab = len(meta["tokenizer.ggml.tokens"])
    print(f"  tokenizer: {meta['tokenizer.ggml.model']}, {vocab} tokens, {len(meta['tokenizer.ggml.merges'])} merges")
    want = expected(meta, vocab)
    got = {t.name: t for t in r.tensors}
    tied = "output.weight" not in got
    if not tied:
        want["output.weight"] = (vocab, meta[f"{arch}.embedding_length"])
    for name in sorted(set(want) | set(got)):
        if name not in got or name not in want:
            print(f"{name}: {'missing' if name not in got else 'unexpected'}")
            ok = False
            continue
        t, shape = got[name], want[name]
        ne = tuple(int(x) for x in t.shape)
        ty = want_type(name, shape, a.type)
        if ne != tuple(reversed(shape)) or t.tensor_type != ty:
            print(f"{name}: ne {ne} {t.tensor_type.name}, expected ne {tuple(reversed(shape))} {ty.name}")
            ok = False
    counts = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    print(f"  every tensor's name, shape and type as expected: {ok} ({counts}; head tied: {tied})")
    if a.hf:
        from safetensors.numpy import load_file
        import glob
        hf = {}
        for f in glob.glob(f"{a.hf}/*.safetensors"):
            hf.update(load_file(f))
        worst = {}
        for t in r.tensors:
            v = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(want[t.name])
            ref = np.asarray(from_hf(t.name, meta, hf), dtype=np.float64)
            err = float(np.abs(v - ref).max()) / max(float(np.abs(ref).max()), 1e-30)
            key = t.tensor_type.name
            worst[key] = max(worst.get(key, 0.0), err)
        print(f"  largest |gguf - converter(hf)| / max|hf| per type: "
              + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
        # f32 must be exact; f16 within one rounding (2^-11 relative); q8_0 within half a step
        # of a 127-step scale (1/254 of the block's largest magnitude).
        bounds = {"F32": 0.0, "F16": 2.0 ** -11, "Q8_0": 0.5 / 127 * 1.01}
        for k, v in worst.items():
            if v > bounds[k]:
                print(f"{k} tensors differ from the converter's by {v:.2e} > {bounds[k]:.2e}")
                ok = False
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
