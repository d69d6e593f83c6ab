//! Reference single-query attention over a key/value cache (one decode step), multi-head or
//! grouped-query.

use crate::ops::AttendOneShape;
use crate::{Error, Result};

/// Writes the key and value heads of `qkv_new` (one q|k|v row, see [`AttendOneShape`]) into row
/// `pos` of `cache`, then for each query head h, reading key/value head g = h / group:
/// `out_h = Σ_{j ≤ pos} softmax_j(q_h·k_{j,g} / √head_dim) v_{j,g}`. The q part of cache row
/// `pos` is left as it is (attention only ever reads keys and values from the cache).
pub fn attend_one(
    out: &mut [f32],
    cache: &mut [f32],
    qkv_new: &[f32],
    pos: usize,
    shape: &AttendOneShape,
) -> Result<()> {
    shape.validate("attend_one", cache.len(), qkv_new.len(), out.len())?;
    if pos >= shape.positions {
        return Err(Error::shape(
            "attend_one",
            format!(
                "position {pos} is past the {} rows of the cache",
                shape.positions
            ),
        ));
    }
    let (hs, row) = (shape.head_dim, shape.qkv_width());
    // The key heads start after the query heads; the value heads after the key heads.
    let (k_start, v_start) = (shape.heads * hs, (shape.heads + shape.kv_heads) * hs);
    cache[pos * row + k_start..(pos + 1) * row].copy_from_slice(&qkv_new[k_start..]);
    let scale = 1.0 / (hs as f32).sqrt();
    for h in 0..shape.heads {
        let g = h / shape.group();
        let q = &qkv_new[h * hs..(h + 1) * hs];
        let scores: Vec<f32> = (0..=pos)
            .map(|j| {
                let k = &cache[j * row + k_start + g * hs..][..hs];
                q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let total: f32 = e.iter().sum();
        for d in 0..hs {
            let acc: f32 = (0..=pos)
                .map(|j| e[j] * cache[j * row + v_start + g * hs + d])
                .sum();
            out[h * hs + d] = acc / total;
        }
    }
    Ok(())
}
