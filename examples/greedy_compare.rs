//! Greedy continuations of two checkpoints side by side (a quantised model and the float one it
//! was made from), token by token:
//!
//!     cargo run --release --example greedy_compare -- MODEL BASE [TOKENS] [PROMPT]
//!
//! Both generate TOKENS (default 100) tokens greedily from PROMPT (default "\n") with the
//! sliding window, so that the context of every token is the last block_size tokens and the
//! logits at any position can be recomputed by one forward pass. Prints whether the two
//! continuations are identical; otherwise the first position where they differ, the token each
//! chose there, and each model's logit gap between the two tokens at that position (how close
//! the choice was).

use kiln::generate::processors::SamplingParams;
use kiln::generate::sampler::{ContextWindow, Generator};
use kiln::{GpuOptions, PrecisionChoice};
use std::path::PathBuf;

fn main() -> kiln::Result<()> {
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: greedy_compare MODEL BASE [TOKENS] [PROMPT]");
        std::process::exit(2);
    }
    let tokens: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let prompt = args.get(3).cloned().unwrap_or_else(|| "\n".into());
    let options = GpuOptions {
        adapter: None,
        precision: PrecisionChoice::F32,
    };
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: tokens,
        ..SamplingParams::default()
    };
    let mut runs = Vec::new();
    for dir in &args[..2] {
        let mut g = Generator::load(&PathBuf::from(dir), &options)?;
        g.set_window(ContextWindow::Slide);
        let out = g.generate(&prompt, &params, |_| {})?;
        println!("{dir} ({}): {:?}", g.weights_description(), out.text);
        runs.push((g, out.ids));
    }
    let (model, base) = (&runs[0], &runs[1]);
    let Some(i) = model.1.iter().zip(&base.1).position(|(a, b)| a != b) else {
        println!("identical: {} greedy tokens", model.1.len());
        return Ok(());
    };
    let mut context = model.0.tokenizer().encode(&prompt)?;
    context.extend_from_slice(&model.1[..i]);
    let block = context.len().min(model.0.block_size());
    let window = &context[context.len() - block..];
    let (a, b) = (model.1[i] as usize, base.1[i] as usize);
    println!("first difference at generated token {i}: model chose {a}, base chose {b}");
    for (name, (g, _)) in [("model", model), ("base", base)] {
        let logits = g.logits_after(window)?;
        println!(
            "{name}: logit[{a}] − logit[{b}] = {:+.5} ({:.5} vs {:.5})",
            logits[a] - logits[b],
            logits[a],
            logits[b]
        );
    }
    Ok(())
}
