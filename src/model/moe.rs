//! Mixture of experts: the `[model.moe]` settings, their rules, and the sizes they imply
//! (which layers are routed, the capacity of an expert, the active parameters per token).
//!
//! A routed MLP replaces the dense MLP of every `every`-th layer: a linear router (no bias)
//! scores `n_experts` experts per token, a softmax turns the scores into probabilities, the
//! `top_k` most probable experts (ties to the lowest index) run their MLP (GELU or SwiGLU, as the
//! architecture's MLP), and their outputs are summed with the selected probabilities
//! renormalised to 1 (with `top_k = 1`, Switch Transformer's rule: the probability itself, since
//! a single renormalised weight is always 1 and would pass no gradient to the router).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// `[model.moe]`: a routed MLP on every `every`-th layer (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MoeConfig {
    /// Experts per routed layer (at least 2).
    pub n_experts: usize,
    /// Experts each token runs through (1 ≤ top_k ≤ n_experts).
    pub top_k: usize,
    /// Each expert takes at most ⌈capacity_factor · tokens · top_k / n_experts⌉ token slots of a
    /// micro-batch; the rest are dropped (their share of the MLP's output is zero, the residual
    /// carries the token on). Give this or `dropless = true`, not both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f64>,
    /// No token is ever dropped: every expert has room for every token of the micro-batch.
    /// False when the TOML leaves it out (so a table giving `capacity_factor` alone is
    /// consistent); [`MoeConfig::default`] is dropless.
    #[serde(default)]
    pub dropless: bool,
    /// Weight of the Switch Transformer load-balancing loss `E · Σ_e f_e · P_e` in the
    /// training loss (summed over routed layers).
    pub aux_loss_coef: f64,
    /// Weight of the router z-loss `mean(logsumexp(router logits)²)` (summed over layers).
    pub router_z_loss_coef: f64,
    /// Route the MLP of layers every−1, 2·every−1, ... (1: every layer).
    pub every: usize,
}

impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            n_experts: 4,
            top_k: 2,
            capacity_factor: None,
            dropless: true,
            aux_loss_coef: 0.01,
            router_z_loss_coef: 0.001,
            every: 1,
        }
    }
}

impl MoeConfig {
    /// Checks every rule, naming the key, the value and the rule.
    pub fn validate(&self, n_layer: usize) -> Result<()> {
        if self.n_experts < 2 {
            return Err(Error::invalid(
                "model.moe.n_experts",
                self.n_experts,
                "must be at least 2 (one expert is a dense MLP: remove [model.moe])",
            ));
        }
        if self.top_k == 0 || self.top_k > self.n_experts {
            return Err(Error::invalid(
                "model.moe.top_k",
                self.top_k,
                format!("must be in 1..=model.moe.n_experts = {}", self.n_experts),
            ));
        }
        match (self.capacity_factor, self.dropless) {
            (Some(f), true) => {
                return Err(Error::invalid(
                    "model.moe.capacity_factor",
                    f,
                    "contradicts model.moe.dropless = true (a dropless router has no capacity); \
                     set one of them",
                ));
            }
            (None, false) => {
                return Err(Error::invalid(
                    "model.moe.dropless",
                    false,
                    "needs model.moe.capacity_factor (e.g. 1.25) to say how many tokens an \
                     expert takes; or set dropless = true",
                ));
            }
            (Some(f), false) if !(f.is_finite() && f > 0.0) => {
                return Err(Error::invalid(
                    "model.moe.capacity_factor",
                    f,
                    "must be a finite number > 0",
                ));
            }
            _ => {}
        }
        for (key, v) in [
            ("model.moe.aux_loss_coef", self.aux_loss_coef),
            ("model.moe.router_z_loss_coef", self.router_z_loss_coef),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(key, v, "must be a finite number ≥ 0"));
            }
        }
        if self.every == 0 || self.every > n_layer {
            return Err(Error::invalid(
                "model.moe.every",
                self.every,
                format!(
                    "must be in 1..=model.n_layer = {n_layer} (routing the MLP of layers every−1, \
                     2·every−1, ...)"
                ),
            ));
        }
        Ok(())
    }

    /// Whether layer `l` (from 0) has a routed MLP.
    pub fn routes_layer(&self, l: usize) -> bool {
        (l + 1).is_multiple_of(self.every)
    }

    /// Token slots each expert has in a micro-batch of `tokens` tokens: all of them when
    /// dropless (a token picks an expert at most once), else
    /// ⌈capacity_factor · tokens · top_k / n_experts⌉, at least 1 and at most `tokens`.
    pub fn capacity(&self, tokens: usize) -> usize {
        match self.capacity_factor {
            Some(f) if !self.dropless => {
                let c = (f * (tokens * self.top_k) as f64 / self.n_experts as f64).ceil();
                (c as usize).clamp(1, tokens)
            }
            _ => tokens,
        }
    }
}

/// Parameters a token passes through: all of them but the experts a token does not run, i.e.
/// `total − Σ_routed layers (n_experts − top_k) · (one expert's parameters)`. `expert_params` is
/// the parameters of the experts of all routed layers together.
pub fn active_parameters(total: usize, expert_params: usize, moe: &MoeConfig) -> usize {
    total - expert_params / moe.n_experts * (moe.n_experts - moe.top_k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_rounds_up_and_stays_within_the_batch() {
        let moe = MoeConfig {
            capacity_factor: Some(1.25),
            dropless: false,
            ..MoeConfig::default()
        };
        // 1.25 · 10 · 2 / 4 = 6.25 → 7.
        assert_eq!(moe.capacity(10), 7);
        assert_eq!(moe.capacity(1), 1);
        let big = MoeConfig {
            capacity_factor: Some(100.0),
            ..moe.clone()
        };
        assert_eq!(big.capacity(10), 10);
        assert_eq!(MoeConfig::default().capacity(37), 37);
    }

    #[test]
    fn every_kth_layer_is_routed() {
        let moe = MoeConfig {
            every: 2,
            ..MoeConfig::default()
        };
        let routed: Vec<usize> = (0..6).filter(|&l| moe.routes_layer(l)).collect();
        assert_eq!(routed, vec![1, 3, 5]);
    }
}
