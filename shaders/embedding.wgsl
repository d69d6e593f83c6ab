// Token + learned position embedding, and its backward.
//
// Forward: out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :], one invocation per output element.
// Backward, without float atomics and deterministic:
//   dwte: one invocation per (token v, channel c) sums dout over the positions holding v, in the
//         order given by a counting sort of the batch that the host writes beside the tokens
//         (order[starts[v]..starts[v + 1]]), so every run adds the same numbers in the same order.
//   dwpe: one invocation per (t, c) of the whole table sums dout over the batch in increasing b.
// Sums are f32; the gradients are stored in T like every other parameter gradient (the flat
// gradient buffer has one precision). With ACCUMULATE the sums are added to the gradient buffers (the token table is also the tied
// output head, whose gradient is written first).

struct Params {
    batch: u32,
    seq: u32,
    channels: u32,
    vocab: u32,
    // Workgroups along x of the dispatch; the linear workgroup index is wg.x + wg.y * groups_x.
    groups_x: u32,
    // Rows of the position table (at least seq).
    positions: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read> wte: array<T>;
@group(0) @binding(3) var<storage, read> wpe: array<T>;
@group(0) @binding(4) var<storage, read_write> out: array<T>;
@group(0) @binding(5) var<storage, read> dout: array<T>;
@group(0) @binding(6) var<storage, read> order: array<u32>;
@group(0) @binding(7) var<storage, read> starts: array<u32>;
@group(0) @binding(8) var<storage, read_write> dwte: array<T>;
@group(0) @binding(9) var<storage, read_write> dwpe: array<T>;

override WG: u32 = 64u;
override ACCUMULATE: bool = false;

fn linear_id(wg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * params.groups_x) * WG + lid;
}

@compute @workgroup_size(WG, 1, 1)
fn embedding_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wg, lid);
    let c = params.channels;
    if i >= params.batch * params.seq * c {
        return;
    }
    let pos = i / c;
    let ch = i % c;
    let tok = tokens[pos];
    // Out-of-vocabulary ids are rejected on the host; this guard only keeps a bad buffer from
    // reading out of bounds.
    var e = 0.0;
    if tok < params.vocab {
        e = f32(wte[tok * c + ch]);
    }
    out[i] = T(e + f32(wpe[(pos % params.seq) * c + ch]));
}

@compute @workgroup_size(WG, 1, 1)
fn embedding_backward_wte(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wg, lid);
    let c = params.channels;
    if i >= params.vocab * c {
        return;
    }
    let v = i / c;
    let ch = i % c;
    var sum = 0.0;
    for (var j = starts[v]; j < starts[v + 1u]; j++) {
        sum += f32(dout[order[j] * c + ch]);
    }
    if ACCUMULATE {
        sum = f32(dwte[i]) + sum;
    }
    dwte[i] = T(sum);
}

@compute @workgroup_size(WG, 1, 1)
fn embedding_backward_wpe(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = linear_id(wg, lid);
    let c = params.channels;
    if i >= params.positions * c {
        return;
    }
    // Rows past T get no gradient this step (zero, or unchanged when accumulating).
    var sum = 0.0;
    if i < params.seq * c {
        for (var b = 0u; b < params.batch; b++) {
            sum += f32(dout[b * params.seq * c + i]);
        }
    }
    if ACCUMULATE {
        sum = f32(dwpe[i]) + sum;
    }
    dwpe[i] = T(sum);
}
