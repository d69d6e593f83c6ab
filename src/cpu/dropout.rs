//! Reference inverted dropout with the counter-based mask of shaders/dropout.wgsl.

/// The per-step settings a dropout dispatch reads (the layout of the shader's `State`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DropoutState {
    /// Stream key of this step and micro-batch.
    pub key: u32,
    /// An element is kept when its random bits are at least this: `round(p · 2³²)`.
    pub threshold: u32,
    /// Kept elements are multiplied by this: `1 / (1 − p)`.
    pub scale: f32,
    /// Pads the struct to 16 bytes.
    pub _pad: u32,
}

impl DropoutState {
    /// Dropout with probability `p` (in [0, 1)) under stream `key`.
    pub fn new(p: f32, key: u32) -> DropoutState {
        let threshold = (f64::from(p) * 4_294_967_296.0)
            .round()
            .min(u32::MAX as f64) as u32;
        DropoutState {
            key,
            threshold,
            scale: if threshold == 0 { 1.0 } else { 1.0 / (1.0 - p) },
            _pad: 0,
        }
    }

    /// Keeps everything and multiplies by exactly 1 (evaluation and inference).
    pub fn off() -> DropoutState {
        DropoutState::new(0.0, 0)
    }

    /// The key for optimizer step `step`, micro-batch `micro`, of a run seeded with `seed`.
    pub fn key_for(seed: u64, step: u64, micro: u32) -> u32 {
        let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
        for word in [step, u64::from(micro)] {
            // splitmix64's finaliser, one round per word.
            h = (h ^ word).wrapping_add(0x9e37_79b9_7f4a_7c15);
            h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            h ^= h >> 31;
        }
        (h ^ (h >> 32)) as u32
    }
}

fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The random bits of element `i` at `site` (the shader's `bits(i, stream())`).
pub fn dropout_bits(state: &DropoutState, site: u32, i: u32) -> u32 {
    let stream = lowbias32(state.key ^ lowbias32(site.wrapping_add(0x9e37_79b9)));
    lowbias32(lowbias32(i ^ stream).wrapping_add(stream))
}

/// `dst[i] = src[i] · scale` where element `i` is kept, else 0. The backward is the same call on
/// the output gradient.
pub fn dropout(dst: &mut [f32], src: &[f32], state: &DropoutState, site: u32) {
    for (i, (d, &s)) in dst.iter_mut().zip(src).enumerate() {
        *d = if dropout_bits(state, site, i as u32) >= state.threshold {
            s * state.scale
        } else {
            0.0
        };
    }
}
