//! Descriptions of the training-step ops (loss, gradient norm, optimizer) shared by the GPU
//! kernels and the CPU reference, so that both take exactly the same arguments.

use crate::{Error, Result};

/// Shape of a fused softmax + cross-entropy: `n` positions, each with `v` logits and one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossEntropySpec {
    /// Positions (rows of the logits).
    pub n: usize,
    /// Vocabulary size (logits per row).
    pub v: usize,
    /// A target equal to this is left out of the loss, the count and the gradient.
    pub ignore_index: u32,
}

impl CrossEntropySpec {
    /// `n` rows of `v` logits, ignoring targets equal to `u32::MAX`.
    pub fn new(n: usize, v: usize) -> Self {
        CrossEntropySpec {
            n,
            v,
            ignore_index: u32::MAX,
        }
    }

    /// The same with another ignore index.
    pub fn ignore_index(mut self, ignore_index: u32) -> Self {
        self.ignore_index = ignore_index;
        self
    }

    /// Checks the lengths of logits, targets, per-row loss and gradient.
    pub fn validate(
        &self,
        logits: usize,
        targets: usize,
        loss: usize,
        dlogits: usize,
    ) -> Result<()> {
        let err = |m: String| Err(Error::shape("crossentropy", format!("{m}; {self:?}")));
        let Some(nv) = self.n.checked_mul(self.v) else {
            return err("n × v overflows".into());
        };
        // The shader indexes rows with u32.
        if nv > u32::MAX as usize {
            return err(format!("n × v = {nv} logits exceed u32 indexing"));
        }
        if self.v == 0 {
            return err("the vocabulary size v must be at least 1".into());
        }
        if (self.ignore_index as usize) < self.v {
            return err(format!(
                "ignore_index {} is a valid class (< v = {}); use u32::MAX or another id >= v",
                self.ignore_index, self.v
            ));
        }
        for (what, got, want) in [
            ("logits", logits, nv),
            ("targets", targets, self.n),
            ("loss", loss, self.n),
            ("dlogits", dlogits, nv),
        ] {
            if got != want {
                return err(format!(
                    "{what} has {got} elements but n = {}, v = {} needs {want}",
                    self.n, self.v
                ));
            }
        }
        Ok(())
    }
}

/// One tensor of the flat parameter buffer: where it lies and whether weight decay applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamSegment {
    /// First element, in elements from the start of the buffer.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Whether AdamW's decoupled weight decay applies (matrices yes; biases, norms usually not).
    pub decayed: bool,
}

/// Checks that `segments` tile `[0, n)` exactly, in order, and returns the decayed element ranges
/// `[start, end)`, sorted, with adjacent ones merged: the form the GPU kernel searches.
pub fn decayed_ranges(segments: &[ParamSegment], n: usize) -> Result<Vec<[u32; 2]>> {
    let mut next = 0usize;
    let mut ranges: Vec<[u32; 2]> = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        if s.offset != next {
            return Err(Error::shape(
                "adamw",
                format!(
                    "segment {i} {s:?} starts at {} but the previous one ends at {next}: segments \
                     must tile the parameter buffer in order without gaps or overlaps",
                    s.offset
                ),
            ));
        }
        next = s.offset.saturating_add(s.len);
        if next > n || n > u32::MAX as usize {
            return Err(Error::shape(
                "adamw",
                format!("segment {i} {s:?} ends past the parameter buffer of {n} elements"),
            ));
        }
        if s.decayed && s.len > 0 {
            let (start, end) = (s.offset as u32, next as u32);
            match ranges.last_mut() {
                Some(last) if last[1] == start => last[1] = end,
                _ => ranges.push([start, end]),
            }
        }
    }
    if next != n {
        return Err(Error::shape(
            "adamw",
            format!("segments cover {next} elements but the parameter buffer has {n}"),
        ));
    }
    Ok(ranges)
}

/// The settings of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Step number, counted from 1 (for the bias corrections `1 - beta^t`).
    pub t: u32,
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (applied as `w *= 1 - lr·wd` to decayed tensors).
    pub weight_decay: f64,
    /// Clip the unscaled global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
    /// The factor the loss (so the gradients) was multiplied by; gradients are divided by it.
    pub loss_scale: f64,
}

impl AdamWStep {
    /// PyTorch's defaults (lr 1e-3, betas 0.9 and 0.999, eps 1e-8, weight decay 0.01), no
    /// clipping, no loss scaling, at step `t`.
    pub fn new(t: u32) -> Self {
        AdamWStep {
            t,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 0.0,
            loss_scale: 1.0,
        }
    }

    /// Checks the ranges PyTorch checks, plus a positive loss scale and t >= 1.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: f64, rule: &str| Err(Error::invalid(key, value, rule));
        // Written so that NaN fails every check.
        let non_negative = |x: f64| x >= 0.0;
        if self.t == 0 {
            return bad("adamw t", 0.0, "steps are counted from 1");
        }
        if !non_negative(self.lr) {
            return bad("adamw lr", self.lr, "must be >= 0");
        }
        for (key, b) in [("adamw beta1", self.beta1), ("adamw beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(key, b, "must be in [0, 1)");
            }
        }
        if !non_negative(self.eps) {
            return bad("adamw eps", self.eps, "must be >= 0");
        }
        if !non_negative(self.weight_decay) {
            return bad("adamw weight_decay", self.weight_decay, "must be >= 0");
        }
        if !non_negative(self.grad_clip) {
            return bad(
                "adamw grad_clip",
                self.grad_clip,
                "must be >= 0 (0 disables)",
            );
        }
        if !(self.loss_scale > 0.0 && self.loss_scale.is_finite()) {
            return bad(
                "adamw loss_scale",
                self.loss_scale,
                "must be finite and > 0",
            );
        }
        Ok(())
    }

    /// The f32 scalars the update uses, each computed in f64 (as PyTorch computes them in Python
    /// floats) and rounded once. The GPU kernel reads exactly these from its step buffer and the
    /// CPU reference uses them too, so the two can differ only in the per-element arithmetic.
    pub fn scalars(&self) -> AdamWScalars {
        let t = f64::from(self.t);
        let bc1 = 1.0 - self.beta1.powf(t);
        let bc2 = 1.0 - self.beta2.powf(t);
        AdamWScalars {
            beta2: self.beta2 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
            grad_clip: self.grad_clip as f32,
            loss_scale: self.loss_scale as f32,
            step_size: (self.lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            decay_factor: (1.0 - self.lr * self.weight_decay) as f32,
            _pad: [0.0; 3],
        }
    }
}

/// [`AdamWStep`] reduced to the f32 values the update uses; the layout of the shader's `Step`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamWScalars {
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta1`, the lerp weight of the first moment.
    pub one_minus_beta1: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `eps`.
    pub eps: f32,
    /// `grad_clip` (0: none).
    pub grad_clip: f32,
    /// `loss_scale`.
    pub loss_scale: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    /// `1 - lr·weight_decay`.
    pub decay_factor: f32,
    /// Pads the struct to 48 bytes.
    pub _pad: [f32; 3],
}

/// Dynamic loss scaling for f16 gradients: the rule of PyTorch's `GradScaler`, run on the GPU by
/// [`crate::kernels::lossscale::LossScaler`] (see shaders/lossscale.wgsl).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaling {
    /// The scale of the first step.
    pub init_scale: f32,
    /// Factor applied after `growth_interval` clean steps in a row.
    pub growth_factor: f32,
    /// Factor applied after a step whose gradients overflowed (that step is skipped).
    pub backoff_factor: f32,
    /// Clean steps in a row before the scale grows.
    pub growth_interval: u32,
    /// Lower bound of the scale.
    pub min_scale: f32,
    /// Upper bound of the scale.
    pub max_scale: f32,
}

impl Default for LossScaling {
    /// PyTorch's defaults (2¹⁶, ×2 after 2000 clean steps, ×0.5 on overflow), kept within
    /// [2⁻²⁴, 2²⁴].
    fn default() -> Self {
        LossScaling {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min_scale: 1.0 / 16_777_216.0,
            max_scale: 16_777_216.0,
        }
    }
}

impl LossScaling {
    /// Checks that every factor moves the scale the way its name says and that the bounds hold
    /// the initial scale.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: f64, rule: &str| Err(Error::invalid(key, value, rule));
        if !(self.min_scale > 0.0 && self.min_scale <= self.max_scale && self.max_scale.is_finite())
        {
            return bad(
                "loss_scale min_scale",
                f64::from(self.min_scale),
                "must be > 0 and <= a finite max_scale",
            );
        }
        if !(self.init_scale >= self.min_scale && self.init_scale <= self.max_scale) {
            return bad(
                "loss_scale init_scale",
                f64::from(self.init_scale),
                &format!("must be in [{}, {}]", self.min_scale, self.max_scale),
            );
        }
        if !(self.growth_factor >= 1.0 && self.growth_factor.is_finite()) {
            return bad(
                "loss_scale growth_factor",
                f64::from(self.growth_factor),
                "must be finite and >= 1",
            );
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad(
                "loss_scale backoff_factor",
                f64::from(self.backoff_factor),
                "must be in (0, 1)",
            );
        }
        if self.growth_interval == 0 {
            return bad("loss_scale growth_interval", 0.0, "must be at least 1");
        }
        Ok(())
    }
}
