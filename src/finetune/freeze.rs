//! `finetune.freeze` patterns: which tensors of a layout stay fixed.
//!
//! The patterns name parts of the model the same way in both architectures:
//!
//! | pattern | tensors |
//! | --- | --- |
//! | `embedding` | the token table and (GPT-2) the position table |
//! | `head` | the output head's weight: Llama's `lm_head`; GPT-2's head is tied to the token table, so this freezes `wte` |
//! | `final_norm` | the norm before the head |
//! | `attn`, `mlp`, `norms` | that part of every block (attention projections, MLP projections, the two block norms) |
//! | `layers.N`, `layers.A-B` | every tensor of block N, or of blocks A to B inclusive |
//! | `layers.A-B.attn` (`.mlp`, `.norms`) | that part of those blocks |
//! | a tensor name | that tensor (`h.0.attn.c_attn.bias`, `model.layers.1.mlp.down_proj.weight`) |
//!
//! A pattern that matches no tensor of the model is an error (a typo would otherwise freeze
//! nothing silently), as is a block range beyond the model's layers.

use crate::model::{Component, TensorInfo};
use crate::{Error, Result};

/// The block a tensor belongs to (`h.3.…`, `model.layers.3.…`), if any.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = name
        .strip_prefix("h.")
        .or_else(|| name.strip_prefix("model.layers."))?;
    rest.split('.').next()?.parse().ok()
}

/// A part of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Attn,
    Mlp,
    Norms,
}

impl Part {
    fn parse(s: &str) -> Option<Part> {
        match s {
            "attn" => Some(Part::Attn),
            "mlp" => Some(Part::Mlp),
            "norms" => Some(Part::Norms),
            _ => None,
        }
    }
    fn component(self) -> Component {
        match self {
            Part::Attn => Component::Attention,
            Part::Mlp => Component::Mlp,
            Part::Norms => Component::Norm,
        }
    }
}

/// One parsed pattern.
#[derive(Clone, Debug, PartialEq)]
enum Pattern {
    Embedding,
    Head,
    FinalNorm,
    Blocks {
        first: usize,
        last: usize,
        part: Option<Part>,
    },
    Tensor(String),
}

fn bad(pattern: &str, rule: impl Into<String>) -> Error {
    Error::invalid("finetune.freeze", format!("{pattern:?}"), rule)
}

fn parse(pattern: &str, n_layer: usize) -> Result<Pattern> {
    match pattern {
        "embedding" => return Ok(Pattern::Embedding),
        "head" => return Ok(Pattern::Head),
        "final_norm" => return Ok(Pattern::FinalNorm),
        _ => {}
    }
    if let Some(part) = Part::parse(pattern) {
        return Ok(Pattern::Blocks {
            first: 0,
            last: n_layer.saturating_sub(1),
            part: Some(part),
        });
    }
    let Some(rest) = pattern.strip_prefix("layers.") else {
        return Ok(Pattern::Tensor(pattern.to_string()));
    };
    let (range, part) = match rest.split_once('.') {
        Some((r, p)) => (
            r,
            Some(Part::parse(p).ok_or_else(|| {
                bad(
                    pattern,
                    format!("unknown block part {p:?}; use attn, mlp or norms"),
                )
            })?),
        ),
        None => (rest, None),
    };
    let number = |s: &str| {
        s.parse::<usize>().map_err(|_| {
            bad(
                pattern,
                "expected layers.N or layers.A-B (block numbers from 0), optionally followed \
                 by .attn, .mlp or .norms",
            )
        })
    };
    let (first, last) = match range.split_once('-') {
        Some((a, b)) => (number(a)?, number(b)?),
        None => {
            let n = number(range)?;
            (n, n)
        }
    };
    if first > last {
        return Err(bad(pattern, "the range's first block is after its last"));
    }
    if last >= n_layer {
        return Err(bad(
            pattern,
            format!("the model has blocks 0 to {}", n_layer.saturating_sub(1)),
        ));
    }
    Ok(Pattern::Blocks { first, last, part })
}

impl Pattern {
    fn matches(&self, t: &TensorInfo, tied_head: bool) -> bool {
        let layer = layer_of(&t.name);
        match self {
            Pattern::Embedding => t.component == Component::Embedding,
            Pattern::Head => {
                t.component == Component::Head
                    || (tied_head
                        && (t.name == "wte.weight" || t.name == "model.embed_tokens.weight"))
            }
            Pattern::FinalNorm => t.component == Component::Norm && layer.is_none(),
            Pattern::Blocks { first, last, part } => {
                layer.is_some_and(|l| (*first..=*last).contains(&l))
                    && part.is_none_or(|p| p.component() == t.component)
            }
            Pattern::Tensor(name) => &t.name == name,
        }
    }
}

/// Which of `tensors` the patterns freeze (one flag per tensor). Errors name a pattern that
/// does not parse or matches nothing.
pub fn frozen_flags(
    patterns: &[String],
    tensors: &[TensorInfo],
    n_layer: usize,
    tied_head: bool,
) -> Result<Vec<bool>> {
    let mut flags = vec![false; tensors.len()];
    for p in patterns {
        let pattern = parse(p.trim(), n_layer)?;
        let mut any = false;
        for (flag, t) in flags.iter_mut().zip(tensors) {
            if pattern.matches(t, tied_head) {
                *flag = true;
                any = true;
            }
        }
        if !any {
            return Err(bad(
                p,
                "matches no tensor of this model; use embedding, head, final_norm, attn, mlp, \
                 norms, layers.N, layers.A-B (optionally .attn, .mlp or .norms) or a tensor name \
                 (kiln params lists them)",
            ));
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ArchKind, ModelConfig, ParamLayout};

    fn names(arch: ArchKind, patterns: &[&str]) -> Result<Vec<String>> {
        let model = ModelConfig {
            arch,
            n_layer: 3,
            n_head: 2,
            n_embd: 8,
            block_size: 4,
            bias: arch == ArchKind::Gpt2,
            ..ModelConfig::default()
        };
        let layout = ParamLayout::gpt(&model, 5, 1)?;
        let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        let tied = model.parts().tie_embeddings;
        let flags = frozen_flags(&p, layout.tensors(), 3, tied)?;
        Ok(layout
            .tensors()
            .iter()
            .zip(flags)
            .filter(|(_, f)| *f)
            .map(|(t, _)| t.name.clone())
            .collect())
    }

    #[test]
    fn patterns_name_the_same_parts_in_both_architectures() {
        assert_eq!(
            names(ArchKind::Gpt2, &["embedding"]).unwrap(),
            ["wte.weight", "wpe.weight"]
        );
        assert_eq!(
            names(ArchKind::Llama, &["embedding"]).unwrap(),
            ["model.embed_tokens.weight"]
        );
        assert_eq!(names(ArchKind::Gpt2, &["head"]).unwrap(), ["wte.weight"]);
        assert_eq!(
            names(ArchKind::Llama, &["head"]).unwrap(),
            ["lm_head.weight"]
        );
        let gpt = names(ArchKind::Gpt2, &["layers.1-2.attn"]).unwrap();
        assert_eq!(gpt.len(), 8, "{gpt:?}");
        assert!(
            gpt.iter()
                .all(|n| n.contains(".attn.") && !n.starts_with("h.0."))
        );
        let llama = names(ArchKind::Llama, &["layers.0"]).unwrap();
        assert!(llama.iter().all(|n| n.starts_with("model.layers.0.")));
        assert_eq!(llama.len(), 6, "{llama:?}");
        assert_eq!(
            names(ArchKind::Llama, &["final_norm"]).unwrap(),
            ["model.norm.weight"]
        );
        assert_eq!(names(ArchKind::Gpt2, &["norms"]).unwrap().len(), 12);
        assert_eq!(
            names(ArchKind::Gpt2, &["h.0.mlp.c_fc.bias"]).unwrap(),
            ["h.0.mlp.c_fc.bias"]
        );
    }

    #[test]
    fn bad_patterns_are_refused_by_name() {
        for p in [
            "layers.3",
            "layers.2-1",
            "layers.x",
            "layers.0.ffn",
            "h.9.attn",
        ] {
            let e = names(ArchKind::Gpt2, &[p]).unwrap_err().to_string();
            assert!(e.contains("finetune.freeze") && e.contains(p), "{p}: {e}");
        }
    }
}
