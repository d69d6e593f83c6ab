// Subgroup extension of the matmul family. This file is compiled appended to matmul.wgsl (it uses
// that file's bindings and helpers) and only on devices that grant SUBGROUP.
//
// matmul_rows_subgroup is matmul_rows with A read cooperatively: every invocation of a subgroup
// needs the same A elements, so instead of each loading all of them (on SIMD-on-CPU adapters
// such as lavapipe that is one gather per element, since they do not prove the address uniform),
// lane i loads element k0 + i of each of the block's rows, a contiguous vector load in the plain
// layout, and step k0 + j takes the values from lane j by a subgroup broadcast or shuffle.

// Forces the generic shuffle loop even where the subgroup size is 8 (the rows_subgroup_shuffle
// variant), so that path is tested and measured on every adapter.
override SHUFFLE_ONLY: bool = false;

@compute @workgroup_size(ROWS_WG_X, 1, 1)
fn matmul_rows_subgroup(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg_size: u32,
) {
    // Each invocation owns 32 rows of 4 columns of C, the columns ROWS_WG_X apart so that
    // neighbouring invocations read neighbouring elements of B.
    let col0 = wg.x * 4u * ROWS_WG_X + lid.x;
    let row0 = wg.y * 32u;
    let z = wg.z;
    let a_base = batch_base(z, dims.a_offset, dims.a_outer, dims.a_inner, dims.a_inner_div);
    let b_base = batch_base(z, dims.b_offset, dims.b_outer, dims.b_inner, dims.b_inner_div);
    let last_col = dims.n - 1u;
    // Distance between consecutive rows of op(A) in the buffer.
    var rs = dims.lda;
    if TRANS_A {
        rs = 1u;
    }
    let c0 = min(col0 + 0u * ROWS_WG_X, last_col);
    let c1 = min(col0 + 1u * ROWS_WG_X, last_col);
    let c2 = min(col0 + 2u * ROWS_WG_X, last_col);
    let c3 = min(col0 + 3u * ROWS_WG_X, last_col);
    // acc<column>_<group of four rows>
    var acc0_0 = vec4<f32>(0.0); var acc0_1 = vec4<f32>(0.0); var acc0_2 = vec4<f32>(0.0); var acc0_3 = vec4<f32>(0.0); var acc0_4 = vec4<f32>(0.0); var acc0_5 = vec4<f32>(0.0); var acc0_6 = vec4<f32>(0.0); var acc0_7 = vec4<f32>(0.0);
    var acc1_0 = vec4<f32>(0.0); var acc1_1 = vec4<f32>(0.0); var acc1_2 = vec4<f32>(0.0); var acc1_3 = vec4<f32>(0.0); var acc1_4 = vec4<f32>(0.0); var acc1_5 = vec4<f32>(0.0); var acc1_6 = vec4<f32>(0.0); var acc1_7 = vec4<f32>(0.0);
    var acc2_0 = vec4<f32>(0.0); var acc2_1 = vec4<f32>(0.0); var acc2_2 = vec4<f32>(0.0); var acc2_3 = vec4<f32>(0.0); var acc2_4 = vec4<f32>(0.0); var acc2_5 = vec4<f32>(0.0); var acc2_6 = vec4<f32>(0.0); var acc2_7 = vec4<f32>(0.0);
    var acc3_0 = vec4<f32>(0.0); var acc3_1 = vec4<f32>(0.0); var acc3_2 = vec4<f32>(0.0); var acc3_3 = vec4<f32>(0.0); var acc3_4 = vec4<f32>(0.0); var acc3_5 = vec4<f32>(0.0); var acc3_6 = vec4<f32>(0.0); var acc3_7 = vec4<f32>(0.0);
    // Causal skips (matmul.wgsl): whole workgroups above the diagonal, the K range of the block.
    if skips_block(row0, 32u, wg.x * 4u * ROWS_WG_X) {
        return;
    }
    let ks = k_range(row0, 32u);
    for (var k0 = ks.x; k0 < ks.y; k0 += sg_size) {
        // This lane's share of A: column k0 + lane of the block's rows (zero past K, which also
        // cancels the clamped B loads below).
        let kl = k0 + lane;
        let kc = min(kl, dims.k - 1u);
        let live = f32(kl < dims.k);
        // Rows past M are clamped in the slow path; a full block reads with plain strides.
        var va0: vec4<f32>;
        var va1: vec4<f32>;
        var va2: vec4<f32>;
        var va3: vec4<f32>;
        var va4: vec4<f32>;
        var va5: vec4<f32>;
        var va6: vec4<f32>;
        var va7: vec4<f32>;
        {
            va0 = a_col4(a_base, row0 + 0u, kc) * live;
            va1 = a_col4(a_base, row0 + 4u, kc) * live;
            va2 = a_col4(a_base, row0 + 8u, kc) * live;
            va3 = a_col4(a_base, row0 + 12u, kc) * live;
            va4 = a_col4(a_base, row0 + 16u, kc) * live;
            va5 = a_col4(a_base, row0 + 20u, kc) * live;
            va6 = a_col4(a_base, row0 + 24u, kc) * live;
            va7 = a_col4(a_base, row0 + 28u, kc) * live;
        }
        if sg_size == 8u && !SHUFFLE_ONLY {
            // lavapipe's size. subgroupBroadcast needs a constant lane, hence the unrolled steps;
            // it compiles to one extract and splat there, while subgroupShuffle with a variable
            // lane becomes a per-lane loop.
            {
                let kk = min(k0 + 0u, dims.k - 1u);
                let s0 = subgroupBroadcast(va0, 0u);
                let s1 = subgroupBroadcast(va1, 0u);
                let s2 = subgroupBroadcast(va2, 0u);
                let s3 = subgroupBroadcast(va3, 0u);
                let s4 = subgroupBroadcast(va4, 0u);
                let s5 = subgroupBroadcast(va5, 0u);
                let s6 = subgroupBroadcast(va6, 0u);
                let s7 = subgroupBroadcast(va7, 0u);
                let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
            }
            {
                let kk = min(k0 + 1u, dims.k - 1u);
                let s0 = subgroupBroadcast(va0, 1u);
                let s1 = subgroupBroadcast(va1, 1u);
                let s2 = subgroupBroadcast(va2, 1u);
                let s3 = subgroupBroadcast(va3, 1u);
                let s4 = subgroupBroadcast(va4, 1u);
                let s5 = subgroupBroadcast(va5, 1u);
                let s6 = subgroupBroadcast(va6, 1u);
                let s7 = subgroupBroadcast(va7, 1u);
                let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
            }
            {
                let kk = min(k0 + 2u, dims.k - 1u);
                let s0 = subgroupBroadcast(va0, 2u);
                let s1 = subgroupBroadcast(va1, 2u);
                let s2 = subgroupBroadcast(va2, 2u);
                let s3 = subgroupBroadcast(va3, 2u);
                let s4 = subgroupBroadcast(va4, 2u);
                let s5 = subgroupBroadcast(va5, 2u);
                let s6 = subgroupBroadcast(va6, 2u);
                let s7 = subgroupBroadcast(va7, 2u);
                let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
            }
            {
                let kk = min(k0 + 3u, dims.k - 1u);
                let s0 = subgroupBroadcast(va0, 3u);
                let s1 = subgroupBroadcast(va1, 3u);
                let s2 = subgroupBroadcast(va2, 3u);
                let s3 = subgroupBroadcast(va3, 3u);
                let s4 = subgroupBroadcast(va4, 3u);
                let s5 = subgroupBroadcast(va5, 3u);
                let s6 = subgroupBroadcast(va6, 3u);
                let s7 = subgroupBroadcast(va7, 3u);
                let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
            }
            {
                let kk = min(k0 + 4u, dims.k - 1u);
                let s0 = subgroupBroadcast(va0, 4u);
                let s1 = subgroupBroadcast(va1, 4u);
                let s2 = subgroupBroadcast(va2, 4u);
                let s3 = subgroupBroadcast(va3, 4u);
                let s4 = subgroupBroadcast(va4, 4u);
                let s5 = subgroupBroadcast(va5, 4u);
                let s6 = subgroupBroadcast(va6, 4u);
                let s7 = subgroupBroadcast(va7, 4u);
                let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
            }
            {
                let kk = min(k0 + 5u, dims.k - 1u);
                let s0 = subgroupBroadcast(va0, 5u);
                let s1 = subgroupBroadcast(va1, 5u);
                let s2 = subgroupBroadcast(va2, 5u);
                let s3 = subgroupBroadcast(va3, 5u);
                let s4 = subgroupBroadcast(va4, 5u);
                let s5 = subgroupBroadcast(va5, 5u);
                let s6 = subgroupBroadcast(va6, 5u);
                let s7 = subgroupBroadcast(va7, 5u);
                let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
            }
            {
                let kk = min(k0 + 6u, dims.k - 1u);
                let s0 = subgroupBroadcast(va0, 6u);
                let s1 = subgroupBroadcast(va1, 6u);
                let s2 = subgroupBroadcast(va2, 6u);
                let s3 = subgroupBroadcast(va3, 6u);
                let s4 = subgroupBroadcast(va4, 6u);
                let s5 = subgroupBroadcast(va5, 6u);
                let s6 = subgroupBroadcast(va6, 6u);
                let s7 = subgroupBroadcast(va7, 6u);
                let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
            }
            {
                let kk = min(k0 + 7u, dims.k - 1u);
                let s0 = subgroupBroadcast(va0, 7u);
                let s1 = subgroupBroadcast(va1, 7u);
                let s2 = subgroupBroadcast(va2, 7u);
                let s3 = subgroupBroadcast(va3, 7u);
                let s4 = subgroupBroadcast(va4, 7u);
                let s5 = subgroupBroadcast(va5, 7u);
                let s6 = subgroupBroadcast(va6, 7u);
                let s7 = subgroupBroadcast(va7, 7u);
                let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
            }
        } else {
            for (var j = 0u; j < sg_size; j++) {
                {
                    let kk = min(k0 + j, dims.k - 1u);
                    let s0 = subgroupShuffle(va0, j);
                    let s1 = subgroupShuffle(va1, j);
                    let s2 = subgroupShuffle(va2, j);
                    let s3 = subgroupShuffle(va3, j);
                    let s4 = subgroupShuffle(va4, j);
                    let s5 = subgroupShuffle(va5, j);
                    let s6 = subgroupShuffle(va6, j);
                    let s7 = subgroupShuffle(va7, j);
                    let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
                    acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3); acc0_4 = fma(s4, b0, acc0_4); acc0_5 = fma(s5, b0, acc0_5); acc0_6 = fma(s6, b0, acc0_6); acc0_7 = fma(s7, b0, acc0_7);
                    let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
                    acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3); acc1_4 = fma(s4, b1, acc1_4); acc1_5 = fma(s5, b1, acc1_5); acc1_6 = fma(s6, b1, acc1_6); acc1_7 = fma(s7, b1, acc1_7);
                    let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
                    acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3); acc2_4 = fma(s4, b2, acc2_4); acc2_5 = fma(s5, b2, acc2_5); acc2_6 = fma(s6, b2, acc2_6); acc2_7 = fma(s7, b2, acc2_7);
                    let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
                    acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3); acc3_4 = fma(s4, b3, acc3_4); acc3_5 = fma(s5, b3, acc3_5); acc3_6 = fma(s6, b3, acc3_6); acc3_7 = fma(s7, b3, acc3_7);
                }
            }
        }
    }
    let c_base = batch_base(z, dims.c_offset, dims.c_outer, dims.c_inner, 1u);
    if col0 + 0u * ROWS_WG_X < dims.n {
        store_c4(c_base, row0 + 0u, col0 + 0u * ROWS_WG_X, acc0_0);
        store_c4(c_base, row0 + 4u, col0 + 0u * ROWS_WG_X, acc0_1);
        store_c4(c_base, row0 + 8u, col0 + 0u * ROWS_WG_X, acc0_2);
        store_c4(c_base, row0 + 12u, col0 + 0u * ROWS_WG_X, acc0_3);
        store_c4(c_base, row0 + 16u, col0 + 0u * ROWS_WG_X, acc0_4);
        store_c4(c_base, row0 + 20u, col0 + 0u * ROWS_WG_X, acc0_5);
        store_c4(c_base, row0 + 24u, col0 + 0u * ROWS_WG_X, acc0_6);
        store_c4(c_base, row0 + 28u, col0 + 0u * ROWS_WG_X, acc0_7);
    }
    if col0 + 1u * ROWS_WG_X < dims.n {
        store_c4(c_base, row0 + 0u, col0 + 1u * ROWS_WG_X, acc1_0);
        store_c4(c_base, row0 + 4u, col0 + 1u * ROWS_WG_X, acc1_1);
        store_c4(c_base, row0 + 8u, col0 + 1u * ROWS_WG_X, acc1_2);
        store_c4(c_base, row0 + 12u, col0 + 1u * ROWS_WG_X, acc1_3);
        store_c4(c_base, row0 + 16u, col0 + 1u * ROWS_WG_X, acc1_4);
        store_c4(c_base, row0 + 20u, col0 + 1u * ROWS_WG_X, acc1_5);
        store_c4(c_base, row0 + 24u, col0 + 1u * ROWS_WG_X, acc1_6);
        store_c4(c_base, row0 + 28u, col0 + 1u * ROWS_WG_X, acc1_7);
    }
    if col0 + 2u * ROWS_WG_X < dims.n {
        store_c4(c_base, row0 + 0u, col0 + 2u * ROWS_WG_X, acc2_0);
        store_c4(c_base, row0 + 4u, col0 + 2u * ROWS_WG_X, acc2_1);
        store_c4(c_base, row0 + 8u, col0 + 2u * ROWS_WG_X, acc2_2);
        store_c4(c_base, row0 + 12u, col0 + 2u * ROWS_WG_X, acc2_3);
        store_c4(c_base, row0 + 16u, col0 + 2u * ROWS_WG_X, acc2_4);
        store_c4(c_base, row0 + 20u, col0 + 2u * ROWS_WG_X, acc2_5);
        store_c4(c_base, row0 + 24u, col0 + 2u * ROWS_WG_X, acc2_6);
        store_c4(c_base, row0 + 28u, col0 + 2u * ROWS_WG_X, acc2_7);
    }
    if col0 + 3u * ROWS_WG_X < dims.n {
        store_c4(c_base, row0 + 0u, col0 + 3u * ROWS_WG_X, acc3_0);
        store_c4(c_base, row0 + 4u, col0 + 3u * ROWS_WG_X, acc3_1);
        store_c4(c_base, row0 + 8u, col0 + 3u * ROWS_WG_X, acc3_2);
        store_c4(c_base, row0 + 12u, col0 + 3u * ROWS_WG_X, acc3_3);
        store_c4(c_base, row0 + 16u, col0 + 3u * ROWS_WG_X, acc3_4);
        store_c4(c_base, row0 + 20u, col0 + 3u * ROWS_WG_X, acc3_5);
        store_c4(c_base, row0 + 24u, col0 + 3u * ROWS_WG_X, acc3_6);
        store_c4(c_base, row0 + 28u, col0 + 3u * ROWS_WG_X, acc3_7);
    }
}
