// Subgroup extension of the matmul family. This file is compiled appended to matmul.wgsl (it uses
// that file's bindings and helpers) and only on devices that grant SUBGROUP.
//
// matmul_rows_subgroup is matmul_rows with A read cooperatively: every invocation of a subgroup
// needs the same A elements, so instead of each loading all of them (on SIMD-on-CPU adapters
// that is one gather per element), lane i loads element k0 + i of each of the 32 rows, a single
// contiguous vector load in the plain layout, and the values are broadcast from lane j with
// subgroupShuffle for step k0 + j.

@compute @workgroup_size(ROWS_WG_X, 1, 1)
fn matmul_rows_subgroup(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg_size: u32,
) {
    // Each invocation owns 16 rows of 4 columns of C, ROWS_WG_X apart so that neighbouring
    // invocations read neighbouring elements of B.
    let col0 = wg.x * 4u * ROWS_WG_X + lid.x;
    let row0 = wg.y * 16u;
    let z = wg.z;
    let a_base = batch_base(z, dims.a_offset, dims.a_outer, dims.a_inner);
    let b_base = batch_base(z, dims.b_offset, dims.b_outer, dims.b_inner);
    let last_col = dims.n - 1u;
    let c0 = min(col0 + 0u * ROWS_WG_X, last_col);
    let c1 = min(col0 + 1u * ROWS_WG_X, last_col);
    let c2 = min(col0 + 2u * ROWS_WG_X, last_col);
    let c3 = min(col0 + 3u * ROWS_WG_X, last_col);
    // acc_<column>_<row group of four>.
    var acc0_0 = vec4<f32>(0.0); var acc0_1 = vec4<f32>(0.0); var acc0_2 = vec4<f32>(0.0); var acc0_3 = vec4<f32>(0.0);
    var acc1_0 = vec4<f32>(0.0); var acc1_1 = vec4<f32>(0.0); var acc1_2 = vec4<f32>(0.0); var acc1_3 = vec4<f32>(0.0);
    var acc2_0 = vec4<f32>(0.0); var acc2_1 = vec4<f32>(0.0); var acc2_2 = vec4<f32>(0.0); var acc2_3 = vec4<f32>(0.0);
    var acc3_0 = vec4<f32>(0.0); var acc3_1 = vec4<f32>(0.0); var acc3_2 = vec4<f32>(0.0); var acc3_3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < dims.k; k0 += sg_size) {
        let kl = k0 + lane;
        let kc = min(kl, dims.k - 1u);
        let live = f32(kl < dims.k);
        let va0 = a_col4(a_base, row0 + 0u, kc) * live;
        let va1 = a_col4(a_base, row0 + 4u, kc) * live;
        let va2 = a_col4(a_base, row0 + 8u, kc) * live;
        let va3 = a_col4(a_base, row0 + 12u, kc) * live;
        for (var j = 0u; j < sg_size; j++) {
            let kk = min(k0 + j, dims.k - 1u);
            let s0 = subgroupShuffle(va0, j);
            let s1 = subgroupShuffle(va1, j);
            let s2 = subgroupShuffle(va2, j);
            let s3 = subgroupShuffle(va3, j);
            let b0 = vec4<f32>(f32(b[b_index(b_base, kk, c0)]));
            acc0_0 = fma(s0, b0, acc0_0); acc0_1 = fma(s1, b0, acc0_1); acc0_2 = fma(s2, b0, acc0_2); acc0_3 = fma(s3, b0, acc0_3);
            let b1 = vec4<f32>(f32(b[b_index(b_base, kk, c1)]));
            acc1_0 = fma(s0, b1, acc1_0); acc1_1 = fma(s1, b1, acc1_1); acc1_2 = fma(s2, b1, acc1_2); acc1_3 = fma(s3, b1, acc1_3);
            let b2 = vec4<f32>(f32(b[b_index(b_base, kk, c2)]));
            acc2_0 = fma(s0, b2, acc2_0); acc2_1 = fma(s1, b2, acc2_1); acc2_2 = fma(s2, b2, acc2_2); acc2_3 = fma(s3, b2, acc2_3);
            let b3 = vec4<f32>(f32(b[b_index(b_base, kk, c3)]));
            acc3_0 = fma(s0, b3, acc3_0); acc3_1 = fma(s1, b3, acc3_1); acc3_2 = fma(s2, b3, acc3_2); acc3_3 = fma(s3, b3, acc3_3);
        }
    }
    let c_base = batch_base(z, dims.c_offset, dims.c_outer, dims.c_inner);
    if col0 + 0u * ROWS_WG_X < dims.n {
        store_c4(c_base, row0 + 0u, col0 + 0u * ROWS_WG_X, acc0_0);
        store_c4(c_base, row0 + 4u, col0 + 0u * ROWS_WG_X, acc0_1);
        store_c4(c_base, row0 + 8u, col0 + 0u * ROWS_WG_X, acc0_2);
        store_c4(c_base, row0 + 12u, col0 + 0u * ROWS_WG_X, acc0_3);
    }
    if col0 + 1u * ROWS_WG_X < dims.n {
        store_c4(c_base, row0 + 0u, col0 + 1u * ROWS_WG_X, acc1_0);
        store_c4(c_base, row0 + 4u, col0 + 1u * ROWS_WG_X, acc1_1);
        store_c4(c_base, row0 + 8u, col0 + 1u * ROWS_WG_X, acc1_2);
        store_c4(c_base, row0 + 12u, col0 + 1u * ROWS_WG_X, acc1_3);
    }
    if col0 + 2u * ROWS_WG_X < dims.n {
        store_c4(c_base, row0 + 0u, col0 + 2u * ROWS_WG_X, acc2_0);
        store_c4(c_base, row0 + 4u, col0 + 2u * ROWS_WG_X, acc2_1);
        store_c4(c_base, row0 + 8u, col0 + 2u * ROWS_WG_X, acc2_2);
        store_c4(c_base, row0 + 12u, col0 + 2u * ROWS_WG_X, acc2_3);
    }
    if col0 + 3u * ROWS_WG_X < dims.n {
        store_c4(c_base, row0 + 0u, col0 + 3u * ROWS_WG_X, acc3_0);
        store_c4(c_base, row0 + 4u, col0 + 3u * ROWS_WG_X, acc3_1);
        store_c4(c_base, row0 + 8u, col0 + 3u * ROWS_WG_X, acc3_2);
        store_c4(c_base, row0 + 12u, col0 + 3u * ROWS_WG_X, acc3_3);
    }
}
