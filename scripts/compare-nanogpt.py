#!/usr/bin/env python3
"""kiln against nanoGPT on PyTorch, same model and batch, on this machine's CPU.

Runs nanoGPT's train.py (its README's CPU command, with the model, batch and optimiser settings
taken from a kiln config) and `kiln train` on that config, back to back, for a few rounds, and
prints the mean milliseconds per step of each (first two steps left out: PyTorch's first
iterations and kiln's first step pay for warm-up and kernel tuning) and their ratio, per round and
as the median over rounds.

Nothing is downloaded: you provide a nanoGPT checkout, a Python with torch and numpy, and the
corpus. If nanoGPT's data/shakespeare_char has no train.bin yet, the corpus given with --data is
copied to its input.txt and its prepare.py is run (prepare.py downloads only when input.txt is
missing).

    python3 scripts/compare-nanogpt.py --nanogpt ../nanoGPT --python /venv/bin/python \\
        --data ../shared/data/tinyshakespeare.txt            # the baby, 200 steps, 3 rounds
    python3 scripts/compare-nanogpt.py ... --config configs/shakespeare-char.toml --steps 5

Needs Python 3.11 (tomllib) and a release build of kiln (cargo build --release).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", required=True, type=Path, help="nanoGPT checkout")
    p.add_argument("--python", default=sys.executable, help="Python with torch and numpy")
    p.add_argument("--kiln", type=Path, default=ROOT / "target/release/kiln")
    p.add_argument("--config", type=Path, default=ROOT / "configs/shakespeare-char-baby.toml")
    p.add_argument("--data", type=Path, required=True, help="character corpus (tinyshakespeare)")
    p.add_argument("--steps", type=int, default=200, help="training steps of each run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads (OMP_NUM_THREADS)")
    p.add_argument("--json", action="store_true", help="one JSON line per round and a summary")
    return p.parse_args()


def fail(msg):
    sys.exit(f"compare-nanogpt: {msg}")


def nanogpt_args(cfg, steps, out_dir):
    m, t = cfg.get("model", {}), cfg.get("train", {})
    if m.get("arch", "gpt2") != "gpt2":
        fail("nanoGPT trains GPT-2 blocks only; pick a config whose model.arch is unset or \"gpt2\"")
    return [
        "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
        "--eval_iters=20", "--log_interval=1", "--always_save_checkpoint=False",
        f"--out_dir={out_dir}", f"--max_iters={steps}",
        f"--eval_interval={steps + 1000}",
        f"--n_layer={m.get('n_layer', 4)}", f"--n_head={m.get('n_head', 4)}",
        f"--n_embd={m.get('n_embd', 128)}", f"--block_size={m.get('block_size', 64)}",
        f"--dropout={m.get('dropout', 0.0)}", f"--bias={m.get('bias', False)}",
        f"--batch_size={t.get('batch_size', 12)}",
        f"--gradient_accumulation_steps={t.get('grad_accum_steps', 1)}",
        f"--learning_rate={t.get('lr', 1e-3)}", f"--min_lr={t.get('min_lr', 1e-4)}",
        f"--warmup_iters={t.get('warmup_steps', 100)}",
        f"--lr_decay_iters={t.get('max_steps', 2000)}",
        f"--weight_decay={t.get('weight_decay', 0.1)}", f"--beta2={t.get('beta2', 0.99)}",
        f"--grad_clip={t.get('grad_clip', 1.0)}",
    ]


def prepare_nanogpt_data(nano, corpus):
    d = nano / "data" / "shakespeare_char"
    if (d / "train.bin").exists():
        return
    if not (d / "input.txt").exists():
        shutil.copyfile(corpus, d / "input.txt")
    subprocess.run([ARGS.python, "prepare.py"], cwd=d, check=True)


def check_steps(n):
    if n < 3:
        fail(f"too few steps timed ({n}); use --steps 3 or more")


def run_nanogpt(cfg, steps, tmp):
    env = dict(os.environ, OMP_NUM_THREADS=str(ARGS.threads), MKL_NUM_THREADS=str(ARGS.threads))
    cmd = [ARGS.python] + nanogpt_args(cfg, steps, tmp / "nano-out")
    r = subprocess.run(cmd, cwd=ARGS.nanogpt, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"nanoGPT failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    ms = [float(x) for x in re.findall(r"^iter \d+: loss [0-9.]+, time ([0-9.]+)ms", r.stdout, re.M)]
    check_steps(len(ms))
    return statistics.mean(ms[2:])


def run_kiln(cfg, steps, tmp):
    out = tmp / "kiln-run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(ARGS.kiln), "train", "--config", str(ARGS.config), "--data", str(ARGS.data),
           "--out", str(out), "--set", f"train.max_steps={steps}",
           "--set", f"train.eval_interval={steps + 1000}",
           # Only the end-of-run evaluation remains; keep it short (a config's eval_batches can
           # be 200 batches, minutes of forward passes that no step time includes anyway).
           "--set", "train.eval_batches=1", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"kiln failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    m, t = cfg.get("model", {}), cfg.get("train", {})
    tokens = t.get("batch_size", 12) * t.get("grad_accum_steps", 1) * m.get("block_size", 64)
    # tokens_per_s is cumulative (tokens so far over training seconds so far), so the seconds
    # elapsed by step i are (i + 1) * tokens / tokens_per_s; the mean of steps 2.. is a difference.
    elapsed = []
    with open(out / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if "tokens_per_s" in rec:
                elapsed.append((rec["step"] + 1) * tokens / rec["tokens_per_s"])
    check_steps(len(elapsed))
    return 1e3 * (elapsed[-1] - elapsed[1]) / (len(elapsed) - 2)


def main():
    if not ARGS.kiln.exists():
        fail(f"{ARGS.kiln} not found: run `cargo build --release` first")
    if not (ARGS.nanogpt / "train.py").exists():
        fail(f"{ARGS.nanogpt} is not a nanoGPT checkout (no train.py)")
    with open(ARGS.config, "rb") as f:
        cfg = tomllib.load(f)
    prepare_nanogpt_data(ARGS.nanogpt, ARGS.data)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-vs-nanogpt-") as tmp:
        tmp = Path(tmp)
        for r in range(1, ARGS.rounds + 1):
            nano = run_nanogpt(cfg, ARGS.steps, tmp)
            kiln = run_kiln(cfg, ARGS.steps, tmp)
            row = {"round": r, "nanogpt_ms": round(nano, 2), "kiln_ms": round(kiln, 2),
                   "ratio": round(kiln / nano, 2)}
            rows.append(row)
            if ARGS.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"round {r}: nanoGPT {nano:.2f} ms/step, kiln {kiln:.2f} ms/step, "
                      f"kiln/nanoGPT {kiln / nano:.2f}", flush=True)
    summary = {k: statistics.median(row[k] for row in rows)
               for k in ("nanogpt_ms", "kiln_ms", "ratio")}
    summary.update(config=str(ARGS.config), steps=ARGS.steps, rounds=ARGS.rounds,
                   threads=ARGS.threads)
    if ARGS.json:
        print(json.dumps({"median": summary}))
    else:
        print(f"median over {ARGS.rounds} rounds: nanoGPT {summary['nanogpt_ms']:.2f} ms/step, "
              f"kiln {summary['kiln_ms']:.2f} ms/step, ratio {summary['ratio']:.2f} "
              f"({ARGS.config.name}, {ARGS.steps} steps, {ARGS.threads} PyTorch threads)")


if __name__ == "__main__":
    ARGS = parse_args()
    main()
