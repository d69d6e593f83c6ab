//! Logits processors, applied in this order: repetition penalty, frequency and presence
//! penalties, temperature (0 = greedy), top-k, top-p; then a draw from a seeded generator.

use crate::{Error, Result};
use rand::RngExt;

/// How to turn logits into the next token.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: no limit is not allowed; use None for no limit).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p, in (0, 1].
    pub top_p: f32,
    /// CTRL's repetition penalty: logits of tokens already present are divided by it when
    /// positive and multiplied by it when negative (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once per previous occurrence of a token (0 = off).
    pub frequency_penalty: f32,
    /// Subtracted once from every token already present (0 = off).
    pub presence_penalty: f32,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Generation stops before any of these strings would be printed.
    pub stop: Vec<String>,
    /// Seed of the draw.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: Some(200),
            top_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            max_tokens: 500,
            stop: Vec::new(),
            seed: 1337,
        }
    }
}

impl SamplingParams {
    /// Checks every setting's range; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                "temperature",
                self.temperature,
                "must be a finite number ≥ 0 (0 is greedy)",
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid(
                "top_k",
                0,
                "must be at least 1 (leave it unset for no limit)",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", self.top_p, "must be in (0, 1]"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::invalid(
                "repetition_penalty",
                self.repetition_penalty,
                "must be a finite number > 0 (1 is off)",
            ));
        }
        if self.max_tokens == 0 {
            return Err(Error::invalid(
                "max_tokens",
                0,
                "must be at least 1: generating nothing is never what was meant",
            ));
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err(Error::invalid(
                format!("stop[{i}]"),
                "\"\"",
                "a stop string must not be empty (it would match before the first token); leave \
                 it out",
            ));
        }
        for (key, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid(key, v, "must be a finite number"));
            }
        }
        Ok(())
    }
}

/// Repetition penalty (CTRL): for every token in `history`, positive logits are divided by
/// `penalty` and negative ones multiplied, so the token becomes less likely either way.
pub fn repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history {
        if let Some(s) = seen.get_mut(t as usize) {
            *s = true;
        }
    }
    for (l, s) in logits.iter_mut().zip(seen) {
        if s {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Frequency penalty (count × value) and presence penalty (value once present), as OpenAI
/// defines them.
pub fn frequency_presence_penalty(
    logits: &mut [f32],
    history: &[u32],
    frequency: f32,
    presence: f32,
) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    let mut counts = vec![0u32; logits.len()];
    for &t in history {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1;
        }
    }
    for (l, c) in logits.iter_mut().zip(counts) {
        if c > 0 {
            *l -= frequency * c as f32 + presence;
        }
    }
}

/// Probabilities after temperature, top-k and top-p; `None` when the temperature is 0 (greedy).
pub fn probabilities(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: f32,
) -> Option<Vec<f32>> {
    if temperature == 0.0 {
        return None;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let k = top_k.unwrap_or(order.len()).min(order.len()).max(1);
    order.truncate(k);
    let max = logits[order[0]];
    let mut p: Vec<f64> = order
        .iter()
        .map(|&i| (f64::from(logits[i] - max) / f64::from(temperature)).exp())
        .collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= sum);
    // Nucleus: the shortest prefix of the sorted distribution whose mass reaches top_p; at least
    // one token always survives.
    let mut mass = 0.0;
    let mut keep = p.len();
    for (i, &x) in p.iter().enumerate() {
        mass += x;
        if mass >= f64::from(top_p) - 1e-12 {
            keep = i + 1;
            break;
        }
    }
    let kept_mass: f64 = p[..keep].iter().sum();
    let mut out = vec![0.0f32; logits.len()];
    for (j, &i) in order.iter().take(keep).enumerate() {
        out[i] = (p[j] / kept_mass) as f32;
    }
    Some(out)
}

/// The index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Applies every processor in order and draws the next token.
pub fn next_token(
    logits: &mut [f32],
    history: &[u32],
    params: &SamplingParams,
    rng: &mut impl rand::Rng,
) -> u32 {
    repetition_penalty(logits, history, params.repetition_penalty);
    frequency_presence_penalty(
        logits,
        history,
        params.frequency_penalty,
        params.presence_penalty,
    );
    match probabilities(logits, params.temperature, params.top_k, params.top_p) {
        None => argmax(logits),
        Some(p) => {
            let u: f64 = rng.random_range(0.0..1.0);
            let mut acc = 0.0;
            let mut last = 0;
            for (i, &x) in p.iter().enumerate() {
                if x > 0.0 {
                    last = i;
                    acc += f64::from(x);
                    if u < acc {
                        return i as u32;
                    }
                }
            }
            last as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neutral_settings_change_nothing() {
        let logits = vec![1.0, -2.0, 0.5, 3.0];
        let mut l = logits.clone();
        repetition_penalty(&mut l, &[0, 1, 3], 1.0);
        frequency_presence_penalty(&mut l, &[0, 1, 3, 3], 0.0, 0.0);
        assert_eq!(l, logits);
    }

    #[test]
    fn repetition_penalty_shrinks_both_signs() {
        let mut l = vec![2.0, -2.0, 2.0];
        repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 2.0]);
    }

    #[test]
    fn frequency_counts_and_presence_once() {
        let mut l = vec![0.0; 3];
        frequency_presence_penalty(&mut l, &[0, 0, 0, 2], 0.5, 1.0);
        assert_eq!(l, vec![-2.5, 0.0, -1.5]);
    }

    #[test]
    fn top_p_keeps_exactly_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 (logits are their logs): top-p 0.9 keeps the first
        // three (0.95 ≥ 0.9), renormalised.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let p = probabilities(&logits, 1.0, None, 0.9).unwrap();
        assert_eq!(p[3], 0.0);
        assert!((p[0] - 0.5 / 0.95).abs() < 1e-6 && (p[2] - 0.15 / 0.95).abs() < 1e-6);
        // A tiny p still keeps the most likely token.
        let p = probabilities(&logits, 1.0, None, 1e-9).unwrap();
        assert_eq!(p, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn top_k_and_greedy() {
        let logits = vec![0.1, 0.9, 0.5, 0.7];
        let p = probabilities(&logits, 1.0, Some(2), 1.0).unwrap();
        assert!(p[0] == 0.0 && p[2] == 0.0 && p[1] > p[3] && p[3] > 0.0);
        assert!(probabilities(&logits, 0.0, Some(2), 1.0).is_none());
        assert_eq!(argmax(&logits), 1);
    }

    #[test]
    fn out_of_range_settings_name_the_setting() {
        let bad = [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
        ];
        for (p, key) in bad {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        SamplingParams::default().validate().unwrap();
    }
}
