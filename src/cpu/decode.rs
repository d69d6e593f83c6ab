//! Reference single-query attention over a key/value cache (one decode step).

/// Writes the k and v of `qkv_new` (3·channels: q|k|v) into row `pos` of `cache` (rows of
/// 3·channels), then for each head: `out_h = Σ_{j ≤ pos} softmax_j(q_h·k_j / √hs) v_j`.
pub fn attend_one(
    out: &mut [f32],
    cache: &mut [f32],
    qkv_new: &[f32],
    pos: usize,
    heads: usize,
    channels: usize,
) {
    let (c, hs) = (channels, channels / heads);
    let row = 3 * c;
    cache[pos * row + c..(pos + 1) * row].copy_from_slice(&qkv_new[c..3 * c]);
    let scale = 1.0 / (hs as f32).sqrt();
    for h in 0..heads {
        let q = &qkv_new[h * hs..(h + 1) * hs];
        let scores: Vec<f32> = (0..=pos)
            .map(|j| {
                let k = &cache[j * row + c + h * hs..][..hs];
                q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let total: f32 = e.iter().sum();
        for d in 0..hs {
            let acc: f32 = (0..=pos)
                .map(|j| e[j] * cache[j * row + 2 * c + h * hs + d])
                .sum();
            out[h * hs + d] = acc / total;
        }
    }
}
