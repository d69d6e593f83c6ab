// Texture-operand extension of the matmul family, compiled appended to matmul.wgsl (it uses that
// file's bindings and helpers) and to one of the two files that define how it writes C,
// matmul_texture_store.wgsl or matmul_texture_store_vec4.wgsl; only on devices that grant
// SUBGROUP.
//
// Two packing dispatches copy op(A) and op(B) into rgba32float textures, one layer per batch
// entry, with the layout the multiply wants whatever the operands' layout, strides and precision:
//
//   A texture: (K rounded up to 32) / 4 texels wide, M rows;  texel (x, row) = op(A)[row, 4x..4x+3]
//   B texture: N / 4 (rounded up) texels wide, K rounded up to 32 rows;  texel (x, k) = op(B)[k, 4x..4x+3]
//
// with zeros past K and N, so the multiply needs no bounds checks along K. An operand stored
// transposed is packed the other way round, along its memory's rows (A_ALONG_M, B_ALONG_K):
//
//   A along M: M / 4 (rounded up) texels wide, K rounded up to 32 rows;  texel (x, k) = op(A)[4x..4x+3, k]
//   B along K: (K rounded up to 32) / 4 texels wide, N rows;  texel (x, col) = op(B)[4x..4x+3, col]
//
// so that its packing reads whole rows, and where its memory already has that layout a
// buffer-to-texture copy fills the texture instead (the host decides; see TexelCopy in
// src/kernels/matmul.rs). Both layouts feed the multiply the same values in the same order. Then matmul_texture
// gives each invocation 32 rows of C by 4 columns. The subgroup loads op(A) cooperatively: lane l
// fetches texel k4 + l of each of the 32 rows (32 consecutive k values across 8 lanes), and step
// j of the 8 that follow takes lane j's texel by subgroupBroadcast, so each A element is fetched
// once per subgroup rather than once per invocation. B comes as one 4x4 block (4 k by 4 columns)
// per step, applied to each row as four fused multiply-adds.
//
// Why textures: on CPU-backed adapters such as lavapipe a storage-buffer load is a loop over the
// SIMD lanes with a bounds check and a branch per lane, while a texel fetch is a branch-free
// gather of 16 bytes per lane. On lavapipe this kernel runs about twice as fast as the best
// storage-buffer variant at 1024^3, packing included. GPUs with real memory hierarchies prefer
// the tiled kernels; the tuner decides per adapter and shape.

// Packing target (matmul_pack_a, matmul_pack_b).
@group(0) @binding(7) var packed: texture_storage_2d_array<rgba32float, write>;
// Packed operands (matmul_texture).
@group(0) @binding(8) var a_packed: texture_2d_array<f32>;
@group(0) @binding(9) var b_packed: texture_2d_array<f32>;
// The packed layouts matmul_texture reads (see above). The packing entry points ignore them: an
// operand packed along its other dimension is packed as the other operand of the transposed
// product, Cᵀ = op(B)ᵀ·op(A)ᵀ, with that product's dims and TRANS flags.
override A_ALONG_M: bool = false;
override B_ALONG_K: bool = false;

// The packing grids are 8 x 8 invocations: 8 texels of a row by 8 rows (or 4-row groups), one
// layer per z, so an invocation's texel is its global id. (Texture extents are at most the
// adapter's 2-D texture limit, 16384 or so, far inside the workgroup-count limit.) The batch
// decomposition of a layer's index divides by the inner batch count and the operand's divisor,
// which the host passes as the overrides below rather than through `dims`: a CPU-backed adapter
// runs every invocation's arithmetic in SIMD lanes with no integer vector division, so a division
// by a uniform value costs a scalar division per lane, and with the grid's old linearisation
// (two more divisions) that was half of each packing dispatch; a division by a constant is a
// multiply and a shift.
override PACK_BATCH_INNER: u32 = 1u;
override PACK_INNER_DIV: u32 = 1u;

fn pack_base(z: u32, offset: u32, outer: u32, inner: u32) -> u32 {
    return offset + (z / PACK_BATCH_INNER) * outer + ((z % PACK_BATCH_INNER) / PACK_INNER_DIV) * inner;
}

// Whether matmul_texture never reads A's texel k4 of `row` under the causal hint (Dims.triangle):
// with op(A) zero past the diagonal a 32-row block stops at k = row0 + 32, with op(A) zero before
// it the block starts at k = row0. Such texels are not packed (up to half of a T x T operand).
fn a_texel_unread(k4: u32, row: u32) -> bool {
    let row0 = row / 32u * 32u;
    return (dims.triangle == 2u && 4u * k4 >= row0 + 32u) || (dims.triangle == 3u && 4u * k4 + 4u <= row0);
}

@compute @workgroup_size(8, 8, 1)
fn matmul_pack_a(
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    let size = textureDimensions(packed);
    if gid.x >= size.x || gid.y >= size.y || a_texel_unread(gid.x, gid.y) {
        return;
    }
    let base = pack_base(gid.z, dims.a_offset, dims.a_outer, dims.a_inner);
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let kk = 4u * gid.x + j;
        if kk < dims.k {
            v[j] = f32(a[a_index(base, gid.y, kk)]);
        }
    }
    textureStore(packed, gid.xy, gid.z, v);
}

@compute @workgroup_size(8, 8, 1)
fn matmul_pack_b(
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    let size = textureDimensions(packed);
    if gid.x >= size.x || gid.y >= size.y {
        return;
    }
    let base = pack_base(gid.z, dims.b_offset, dims.b_outer, dims.b_inner);
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let col = 4u * gid.x + j;
        if col < dims.n && gid.y < dims.k {
            v[j] = f32(b[b_index(base, gid.y, col)]);
        }
    }
    textureStore(packed, gid.xy, gid.z, v);
}

// Vec4 packing, used when vec4_ok holds (contiguous extents, leading dimensions, offsets and
// batch strides all multiples of 4, as for matmul_tiled_vec4). Where the texel runs along the
// operand's contiguous dimension one vec4 load fills it; where it runs across it (A with
// TRANS_A, B with TRANS_B) an invocation loads a 4x4 block as four vec4 along the contiguous
// dimension and writes four texels, so no load is a scalar one.
@compute @workgroup_size(8, 8, 1)
fn matmul_pack_a_vec4(
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    let size = textureDimensions(packed);
    let base = pack_base(gid.z, dims.a_offset, dims.a_outer, dims.a_inner);
    if TRANS_A {
        // Rows 4 gid.y .. 4 gid.y + 3 (M is a multiple of 4) by texel gid.x.
        let row = 4u * gid.y;
        if gid.x >= size.x || row >= size.y || a_texel_unread(gid.x, row) {
            return;
        }
        var v: array<vec4<f32>, 4>;
        for (var j = 0u; j < 4u; j++) {
            let kk = 4u * gid.x + j;
            if kk < dims.k {
                v[j] = vec4<f32>(a4[a_index(base, row, kk) / 4u]);
            }
        }
        for (var i = 0u; i < 4u; i++) {
            textureStore(packed, vec2<u32>(gid.x, row + i), gid.z, vec4<f32>(v[0][i], v[1][i], v[2][i], v[3][i]));
        }
    } else {
        if gid.x >= size.x || gid.y >= size.y || a_texel_unread(gid.x, gid.y) {
            return;
        }
        var v = vec4<f32>(0.0);
        if 4u * gid.x < dims.k {
            v = vec4<f32>(a4[a_index(base, gid.y, 4u * gid.x) / 4u]);
        }
        textureStore(packed, gid.xy, gid.z, v);
    }
}

@compute @workgroup_size(8, 8, 1)
fn matmul_pack_b_vec4(
    @builtin(global_invocation_id) gid: vec3<u32>,
) {
    let size = textureDimensions(packed);
    let base = pack_base(gid.z, dims.b_offset, dims.b_outer, dims.b_inner);
    if TRANS_B {
        // k rows 4 gid.y .. 4 gid.y + 3 by texel gid.x (K is a multiple of 4).
        let kk = 4u * gid.y;
        if gid.x >= size.x || kk >= size.y {
            return;
        }
        var v: array<vec4<f32>, 4>;
        for (var j = 0u; j < 4u; j++) {
            let col = 4u * gid.x + j;
            if col < dims.n && kk < dims.k {
                v[j] = vec4<f32>(b4[b_index(base, kk, col) / 4u]);
            }
        }
        for (var i = 0u; i < 4u; i++) {
            textureStore(packed, vec2<u32>(gid.x, kk + i), gid.z, vec4<f32>(v[0][i], v[1][i], v[2][i], v[3][i]));
        }
    } else {
        if gid.x >= size.x || gid.y >= size.y {
            return;
        }
        var v = vec4<f32>(0.0);
        if gid.y < dims.k {
            v = vec4<f32>(b4[b_index(base, gid.y, 4u * gid.x) / 4u]);
        }
        textureStore(packed, gid.xy, gid.z, v);
    }
}

// Batch entry z's place in a packed texture: (layer, first texel along x). One layer per batch
// entry, or, where the host copies a two-level batch whose inner entries sit side by side in
// each row (attention's heads), one layer per outer entry with the inner ones side by side.
fn texture_place(z: u32, tex_div: u32, inner_div: u32, tex_step: u32) -> vec2<u32> {
    return vec2<u32>(z / tex_div, ((z % tex_div) / inner_div) * tex_step);
}

// Texel (k4, row) of the packed A at `at` (texture_place); rows past M are clamped (their
// results are never stored).
fn a_texel(at: vec2<u32>, k4: u32, row: u32) -> vec4<f32> {
    return textureLoad(a_packed, vec2<u32>(at.y + k4, min(row, dims.m - 1u)), at.x, 0);
}

// op(A)[row + i, 4 k4 .. 4 k4 + 3] as column i, for the four rows from `row` (a multiple of 4).
// Packed along K that is four texels; packed along M (A_ALONG_M) it is the four texels of k =
// 4 k4 .. 4 k4 + 3 at row group row / 4, transposed. A transpose costs nothing where each
// component is a register of its own (a CPU-backed adapter's SIMD lanes), and the values are
// the same either way, so the layout never changes a result.
fn a_rows4(at: vec2<u32>, k4: u32, row: u32) -> mat4x4<f32> {
    if A_ALONG_M {
        let m4 = at.y + min(row / 4u, (dims.m + 3u) / 4u - 1u);
        let k = 4u * k4;
        return transpose(mat4x4<f32>(
            textureLoad(a_packed, vec2<u32>(m4, k), at.x, 0),
            textureLoad(a_packed, vec2<u32>(m4, k + 1u), at.x, 0),
            textureLoad(a_packed, vec2<u32>(m4, k + 2u), at.x, 0),
            textureLoad(a_packed, vec2<u32>(m4, k + 3u), at.x, 0),
        ));
    }
    return mat4x4<f32>(a_texel(at, k4, row), a_texel(at, k4, row + 1u), a_texel(at, k4, row + 2u), a_texel(at, k4, row + 3u));
}

// Columns are op(B)[k, 4cg..4cg+3] for k = kb..kb+3, so  block * (a[kb], .., a[kb+3])  is the
// step's contribution to four columns of one row.
// Packed along K (B_ALONG_K) a texel holds 4 k of one column: one texel per column (clamped to
// the last column past N), transposed.
fn b_block(at: vec2<u32>, cg: u32, kb: u32) -> mat4x4<f32> {
    if B_ALONG_K {
        let col = 4u * cg;
        let last = dims.n - 1u;
        let x = at.y + kb / 4u;
        return transpose(mat4x4<f32>(
            textureLoad(b_packed, vec2<u32>(x, min(col, last)), at.x, 0),
            textureLoad(b_packed, vec2<u32>(x, min(col + 1u, last)), at.x, 0),
            textureLoad(b_packed, vec2<u32>(x, min(col + 2u, last)), at.x, 0),
            textureLoad(b_packed, vec2<u32>(x, min(col + 3u, last)), at.x, 0),
        ));
    }
    let x = at.y + cg;
    return mat4x4<f32>(
        textureLoad(b_packed, vec2<u32>(x, kb), at.x, 0),
        textureLoad(b_packed, vec2<u32>(x, kb + 1u), at.x, 0),
        textureLoad(b_packed, vec2<u32>(x, kb + 2u), at.x, 0),
        textureLoad(b_packed, vec2<u32>(x, kb + 3u), at.x, 0),
    );
}

// acc + block * a as four fused multiply-adds in increasing k: the same operations in the same
// order as every other variant of the family, so the choice of variant never changes a result.
fn block_fma(a: vec4<f32>, block: mat4x4<f32>, acc: vec4<f32>) -> vec4<f32> {
    let r = fma(vec4<f32>(a.x), block[0], acc);
    let s = fma(vec4<f32>(a.y), block[1], r);
    let t = fma(vec4<f32>(a.z), block[2], s);
    return fma(vec4<f32>(a.w), block[3], t);
}

@compute @workgroup_size(ROWS_WG_X, 1, 1)
fn matmul_texture(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let z = wg.z;
    let a_at = texture_place(z, dims.a_tex_div, dims.a_inner_div, dims.a_tex_step);
    let b_at = texture_place(z, dims.b_tex_div, dims.b_inner_div, dims.b_tex_step);
    let group = wg.x * ROWS_WG_X + lid.x;
    // Column groups past N are clamped, not returned from: every invocation must reach the
    // subgroup operations.
    let cg = min(group, (dims.n + 3u) / 4u - 1u);
    let row0 = wg.y * 32u;
    // Lanes past the eighth (subgroups wider than lavapipe's 8) repeat the first eight's loads.
    let sl = lane % 8u;
    var k4_begin = 0u;
    var k4_end = (dims.k + 31u) / 32u * 8u;
    // Causal skips (Dims.triangle), decided per workgroup so that the subgroup operations below
    // stay in uniform control flow. Whole blocks of C above the diagonal are not computed (the
    // host makes the workgroup 32 columns wide; `skips_block`, matmul.wgsl); where op(A) is zero
    // past (or before) the diagonal, the block's rows row0..row0+31 stop at k = row0 + 32 (or
    // start at k = row0), which drops only exact zero terms, so the result is bit for bit the
    // full sum's. The k bounds are in texels and must be exactly those `a_texel_unread` leaves
    // unpacked, so they are not `k_range`'s, which clamps its start to K: a block starting past K
    // would then read padding texels the packing skipped.
    if skips_block(row0, 32u, wg.x * ROWS_WG_X * 4u) {
        return;
    }
    if dims.triangle == 2u {
        k4_end = min(k4_end, (row0 + 32u) / 4u);
    }
    if dims.triangle == 3u {
        k4_begin = row0 / 4u;
    }
    var acc0 = vec4<f32>(0.0); var acc1 = vec4<f32>(0.0); var acc2 = vec4<f32>(0.0); var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0); var acc5 = vec4<f32>(0.0); var acc6 = vec4<f32>(0.0); var acc7 = vec4<f32>(0.0);
    var acc8 = vec4<f32>(0.0); var acc9 = vec4<f32>(0.0); var acc10 = vec4<f32>(0.0); var acc11 = vec4<f32>(0.0);
    var acc12 = vec4<f32>(0.0); var acc13 = vec4<f32>(0.0); var acc14 = vec4<f32>(0.0); var acc15 = vec4<f32>(0.0);
    var acc16 = vec4<f32>(0.0); var acc17 = vec4<f32>(0.0); var acc18 = vec4<f32>(0.0); var acc19 = vec4<f32>(0.0);
    var acc20 = vec4<f32>(0.0); var acc21 = vec4<f32>(0.0); var acc22 = vec4<f32>(0.0); var acc23 = vec4<f32>(0.0);
    var acc24 = vec4<f32>(0.0); var acc25 = vec4<f32>(0.0); var acc26 = vec4<f32>(0.0); var acc27 = vec4<f32>(0.0);
    var acc28 = vec4<f32>(0.0); var acc29 = vec4<f32>(0.0); var acc30 = vec4<f32>(0.0); var acc31 = vec4<f32>(0.0);
    for (var k4 = k4_begin; k4 < k4_end; k4 += 8u) {
        let ma0 = a_rows4(a_at, k4 + sl, row0 + 0u); let ma1 = a_rows4(a_at, k4 + sl, row0 + 4u);
        let ma2 = a_rows4(a_at, k4 + sl, row0 + 8u); let ma3 = a_rows4(a_at, k4 + sl, row0 + 12u);
        let ma4 = a_rows4(a_at, k4 + sl, row0 + 16u); let ma5 = a_rows4(a_at, k4 + sl, row0 + 20u);
        let ma6 = a_rows4(a_at, k4 + sl, row0 + 24u); let ma7 = a_rows4(a_at, k4 + sl, row0 + 28u);
        let va0 = ma0[0]; let va1 = ma0[1]; let va2 = ma0[2]; let va3 = ma0[3];
        let va4 = ma1[0]; let va5 = ma1[1]; let va6 = ma1[2]; let va7 = ma1[3];
        let va8 = ma2[0]; let va9 = ma2[1]; let va10 = ma2[2]; let va11 = ma2[3];
        let va12 = ma3[0]; let va13 = ma3[1]; let va14 = ma3[2]; let va15 = ma3[3];
        let va16 = ma4[0]; let va17 = ma4[1]; let va18 = ma4[2]; let va19 = ma4[3];
        let va20 = ma5[0]; let va21 = ma5[1]; let va22 = ma5[2]; let va23 = ma5[3];
        let va24 = ma6[0]; let va25 = ma6[1]; let va26 = ma6[2]; let va27 = ma6[3];
        let va28 = ma7[0]; let va29 = ma7[1]; let va30 = ma7[2]; let va31 = ma7[3];
        {
            let bm = b_block(b_at, cg, (k4 + 0u) * 4u);
            acc0 = block_fma(subgroupBroadcast(va0, 0u), bm, acc0); acc1 = block_fma(subgroupBroadcast(va1, 0u), bm, acc1);
            acc2 = block_fma(subgroupBroadcast(va2, 0u), bm, acc2); acc3 = block_fma(subgroupBroadcast(va3, 0u), bm, acc3);
            acc4 = block_fma(subgroupBroadcast(va4, 0u), bm, acc4); acc5 = block_fma(subgroupBroadcast(va5, 0u), bm, acc5);
            acc6 = block_fma(subgroupBroadcast(va6, 0u), bm, acc6); acc7 = block_fma(subgroupBroadcast(va7, 0u), bm, acc7);
            acc8 = block_fma(subgroupBroadcast(va8, 0u), bm, acc8); acc9 = block_fma(subgroupBroadcast(va9, 0u), bm, acc9);
            acc10 = block_fma(subgroupBroadcast(va10, 0u), bm, acc10); acc11 = block_fma(subgroupBroadcast(va11, 0u), bm, acc11);
            acc12 = block_fma(subgroupBroadcast(va12, 0u), bm, acc12); acc13 = block_fma(subgroupBroadcast(va13, 0u), bm, acc13);
            acc14 = block_fma(subgroupBroadcast(va14, 0u), bm, acc14); acc15 = block_fma(subgroupBroadcast(va15, 0u), bm, acc15);
            acc16 = block_fma(subgroupBroadcast(va16, 0u), bm, acc16); acc17 = block_fma(subgroupBroadcast(va17, 0u), bm, acc17);
            acc18 = block_fma(subgroupBroadcast(va18, 0u), bm, acc18); acc19 = block_fma(subgroupBroadcast(va19, 0u), bm, acc19);
            acc20 = block_fma(subgroupBroadcast(va20, 0u), bm, acc20); acc21 = block_fma(subgroupBroadcast(va21, 0u), bm, acc21);
            acc22 = block_fma(subgroupBroadcast(va22, 0u), bm, acc22); acc23 = block_fma(subgroupBroadcast(va23, 0u), bm, acc23);
            acc24 = block_fma(subgroupBroadcast(va24, 0u), bm, acc24); acc25 = block_fma(subgroupBroadcast(va25, 0u), bm, acc25);
            acc26 = block_fma(subgroupBroadcast(va26, 0u), bm, acc26); acc27 = block_fma(subgroupBroadcast(va27, 0u), bm, acc27);
            acc28 = block_fma(subgroupBroadcast(va28, 0u), bm, acc28); acc29 = block_fma(subgroupBroadcast(va29, 0u), bm, acc29);
            acc30 = block_fma(subgroupBroadcast(va30, 0u), bm, acc30); acc31 = block_fma(subgroupBroadcast(va31, 0u), bm, acc31);
        }
        {
            let bm = b_block(b_at, cg, (k4 + 1u) * 4u);
            acc0 = block_fma(subgroupBroadcast(va0, 1u), bm, acc0); acc1 = block_fma(subgroupBroadcast(va1, 1u), bm, acc1);
            acc2 = block_fma(subgroupBroadcast(va2, 1u), bm, acc2); acc3 = block_fma(subgroupBroadcast(va3, 1u), bm, acc3);
            acc4 = block_fma(subgroupBroadcast(va4, 1u), bm, acc4); acc5 = block_fma(subgroupBroadcast(va5, 1u), bm, acc5);
            acc6 = block_fma(subgroupBroadcast(va6, 1u), bm, acc6); acc7 = block_fma(subgroupBroadcast(va7, 1u), bm, acc7);
            acc8 = block_fma(subgroupBroadcast(va8, 1u), bm, acc8); acc9 = block_fma(subgroupBroadcast(va9, 1u), bm, acc9);
            acc10 = block_fma(subgroupBroadcast(va10, 1u), bm, acc10); acc11 = block_fma(subgroupBroadcast(va11, 1u), bm, acc11);
            acc12 = block_fma(subgroupBroadcast(va12, 1u), bm, acc12); acc13 = block_fma(subgroupBroadcast(va13, 1u), bm, acc13);
            acc14 = block_fma(subgroupBroadcast(va14, 1u), bm, acc14); acc15 = block_fma(subgroupBroadcast(va15, 1u), bm, acc15);
            acc16 = block_fma(subgroupBroadcast(va16, 1u), bm, acc16); acc17 = block_fma(subgroupBroadcast(va17, 1u), bm, acc17);
            acc18 = block_fma(subgroupBroadcast(va18, 1u), bm, acc18); acc19 = block_fma(subgroupBroadcast(va19, 1u), bm, acc19);
            acc20 = block_fma(subgroupBroadcast(va20, 1u), bm, acc20); acc21 = block_fma(subgroupBroadcast(va21, 1u), bm, acc21);
            acc22 = block_fma(subgroupBroadcast(va22, 1u), bm, acc22); acc23 = block_fma(subgroupBroadcast(va23, 1u), bm, acc23);
            acc24 = block_fma(subgroupBroadcast(va24, 1u), bm, acc24); acc25 = block_fma(subgroupBroadcast(va25, 1u), bm, acc25);
            acc26 = block_fma(subgroupBroadcast(va26, 1u), bm, acc26); acc27 = block_fma(subgroupBroadcast(va27, 1u), bm, acc27);
            acc28 = block_fma(subgroupBroadcast(va28, 1u), bm, acc28); acc29 = block_fma(subgroupBroadcast(va29, 1u), bm, acc29);
            acc30 = block_fma(subgroupBroadcast(va30, 1u), bm, acc30); acc31 = block_fma(subgroupBroadcast(va31, 1u), bm, acc31);
        }
        {
            let bm = b_block(b_at, cg, (k4 + 2u) * 4u);
            acc0 = block_fma(subgroupBroadcast(va0, 2u), bm, acc0); acc1 = block_fma(subgroupBroadcast(va1, 2u), bm, acc1);
            acc2 = block_fma(subgroupBroadcast(va2, 2u), bm, acc2); acc3 = block_fma(subgroupBroadcast(va3, 2u), bm, acc3);
            acc4 = block_fma(subgroupBroadcast(va4, 2u), bm, acc4); acc5 = block_fma(subgroupBroadcast(va5, 2u), bm, acc5);
            acc6 = block_fma(subgroupBroadcast(va6, 2u), bm, acc6); acc7 = block_fma(subgroupBroadcast(va7, 2u), bm, acc7);
            acc8 = block_fma(subgroupBroadcast(va8, 2u), bm, acc8); acc9 = block_fma(subgroupBroadcast(va9, 2u), bm, acc9);
            acc10 = block_fma(subgroupBroadcast(va10, 2u), bm, acc10); acc11 = block_fma(subgroupBroadcast(va11, 2u), bm, acc11);
            acc12 = block_fma(subgroupBroadcast(va12, 2u), bm, acc12); acc13 = block_fma(subgroupBroadcast(va13, 2u), bm, acc13);
            acc14 = block_fma(subgroupBroadcast(va14, 2u), bm, acc14); acc15 = block_fma(subgroupBroadcast(va15, 2u), bm, acc15);
            acc16 = block_fma(subgroupBroadcast(va16, 2u), bm, acc16); acc17 = block_fma(subgroupBroadcast(va17, 2u), bm, acc17);
            acc18 = block_fma(subgroupBroadcast(va18, 2u), bm, acc18); acc19 = block_fma(subgroupBroadcast(va19, 2u), bm, acc19);
            acc20 = block_fma(subgroupBroadcast(va20, 2u), bm, acc20); acc21 = block_fma(subgroupBroadcast(va21, 2u), bm, acc21);
            acc22 = block_fma(subgroupBroadcast(va22, 2u), bm, acc22); acc23 = block_fma(subgroupBroadcast(va23, 2u), bm, acc23);
            acc24 = block_fma(subgroupBroadcast(va24, 2u), bm, acc24); acc25 = block_fma(subgroupBroadcast(va25, 2u), bm, acc25);
            acc26 = block_fma(subgroupBroadcast(va26, 2u), bm, acc26); acc27 = block_fma(subgroupBroadcast(va27, 2u), bm, acc27);
            acc28 = block_fma(subgroupBroadcast(va28, 2u), bm, acc28); acc29 = block_fma(subgroupBroadcast(va29, 2u), bm, acc29);
            acc30 = block_fma(subgroupBroadcast(va30, 2u), bm, acc30); acc31 = block_fma(subgroupBroadcast(va31, 2u), bm, acc31);
        }
        {
            let bm = b_block(b_at, cg, (k4 + 3u) * 4u);
            acc0 = block_fma(subgroupBroadcast(va0, 3u), bm, acc0); acc1 = block_fma(subgroupBroadcast(va1, 3u), bm, acc1);
            acc2 = block_fma(subgroupBroadcast(va2, 3u), bm, acc2); acc3 = block_fma(subgroupBroadcast(va3, 3u), bm, acc3);
            acc4 = block_fma(subgroupBroadcast(va4, 3u), bm, acc4); acc5 = block_fma(subgroupBroadcast(va5, 3u), bm, acc5);
            acc6 = block_fma(subgroupBroadcast(va6, 3u), bm, acc6); acc7 = block_fma(subgroupBroadcast(va7, 3u), bm, acc7);
            acc8 = block_fma(subgroupBroadcast(va8, 3u), bm, acc8); acc9 = block_fma(subgroupBroadcast(va9, 3u), bm, acc9);
            acc10 = block_fma(subgroupBroadcast(va10, 3u), bm, acc10); acc11 = block_fma(subgroupBroadcast(va11, 3u), bm, acc11);
            acc12 = block_fma(subgroupBroadcast(va12, 3u), bm, acc12); acc13 = block_fma(subgroupBroadcast(va13, 3u), bm, acc13);
            acc14 = block_fma(subgroupBroadcast(va14, 3u), bm, acc14); acc15 = block_fma(subgroupBroadcast(va15, 3u), bm, acc15);
            acc16 = block_fma(subgroupBroadcast(va16, 3u), bm, acc16); acc17 = block_fma(subgroupBroadcast(va17, 3u), bm, acc17);
            acc18 = block_fma(subgroupBroadcast(va18, 3u), bm, acc18); acc19 = block_fma(subgroupBroadcast(va19, 3u), bm, acc19);
            acc20 = block_fma(subgroupBroadcast(va20, 3u), bm, acc20); acc21 = block_fma(subgroupBroadcast(va21, 3u), bm, acc21);
            acc22 = block_fma(subgroupBroadcast(va22, 3u), bm, acc22); acc23 = block_fma(subgroupBroadcast(va23, 3u), bm, acc23);
            acc24 = block_fma(subgroupBroadcast(va24, 3u), bm, acc24); acc25 = block_fma(subgroupBroadcast(va25, 3u), bm, acc25);
            acc26 = block_fma(subgroupBroadcast(va26, 3u), bm, acc26); acc27 = block_fma(subgroupBroadcast(va27, 3u), bm, acc27);
            acc28 = block_fma(subgroupBroadcast(va28, 3u), bm, acc28); acc29 = block_fma(subgroupBroadcast(va29, 3u), bm, acc29);
            acc30 = block_fma(subgroupBroadcast(va30, 3u), bm, acc30); acc31 = block_fma(subgroupBroadcast(va31, 3u), bm, acc31);
        }
        {
            let bm = b_block(b_at, cg, (k4 + 4u) * 4u);
            acc0 = block_fma(subgroupBroadcast(va0, 4u), bm, acc0); acc1 = block_fma(subgroupBroadcast(va1, 4u), bm, acc1);
            acc2 = block_fma(subgroupBroadcast(va2, 4u), bm, acc2); acc3 = block_fma(subgroupBroadcast(va3, 4u), bm, acc3);
            acc4 = block_fma(subgroupBroadcast(va4, 4u), bm, acc4); acc5 = block_fma(subgroupBroadcast(va5, 4u), bm, acc5);
            acc6 = block_fma(subgroupBroadcast(va6, 4u), bm, acc6); acc7 = block_fma(subgroupBroadcast(va7, 4u), bm, acc7);
            acc8 = block_fma(subgroupBroadcast(va8, 4u), bm, acc8); acc9 = block_fma(subgroupBroadcast(va9, 4u), bm, acc9);
            acc10 = block_fma(subgroupBroadcast(va10, 4u), bm, acc10); acc11 = block_fma(subgroupBroadcast(va11, 4u), bm, acc11);
            acc12 = block_fma(subgroupBroadcast(va12, 4u), bm, acc12); acc13 = block_fma(subgroupBroadcast(va13, 4u), bm, acc13);
            acc14 = block_fma(subgroupBroadcast(va14, 4u), bm, acc14); acc15 = block_fma(subgroupBroadcast(va15, 4u), bm, acc15);
            acc16 = block_fma(subgroupBroadcast(va16, 4u), bm, acc16); acc17 = block_fma(subgroupBroadcast(va17, 4u), bm, acc17);
            acc18 = block_fma(subgroupBroadcast(va18, 4u), bm, acc18); acc19 = block_fma(subgroupBroadcast(va19, 4u), bm, acc19);
            acc20 = block_fma(subgroupBroadcast(va20, 4u), bm, acc20); acc21 = block_fma(subgroupBroadcast(va21, 4u), bm, acc21);
            acc22 = block_fma(subgroupBroadcast(va22, 4u), bm, acc22); acc23 = block_fma(subgroupBroadcast(va23, 4u), bm, acc23);
            acc24 = block_fma(subgroupBroadcast(va24, 4u), bm, acc24); acc25 = block_fma(subgroupBroadcast(va25, 4u), bm, acc25);
            acc26 = block_fma(subgroupBroadcast(va26, 4u), bm, acc26); acc27 = block_fma(subgroupBroadcast(va27, 4u), bm, acc27);
            acc28 = block_fma(subgroupBroadcast(va28, 4u), bm, acc28); acc29 = block_fma(subgroupBroadcast(va29, 4u), bm, acc29);
            acc30 = block_fma(subgroupBroadcast(va30, 4u), bm, acc30); acc31 = block_fma(subgroupBroadcast(va31, 4u), bm, acc31);
        }
        {
            let bm = b_block(b_at, cg, (k4 + 5u) * 4u);
            acc0 = block_fma(subgroupBroadcast(va0, 5u), bm, acc0); acc1 = block_fma(subgroupBroadcast(va1, 5u), bm, acc1);
            acc2 = block_fma(subgroupBroadcast(va2, 5u), bm, acc2); acc3 = block_fma(subgroupBroadcast(va3, 5u), bm, acc3);
            acc4 = block_fma(subgroupBroadcast(va4, 5u), bm, acc4); acc5 = block_fma(subgroupBroadcast(va5, 5u), bm, acc5);
            acc6 = block_fma(subgroupBroadcast(va6, 5u), bm, acc6); acc7 = block_fma(subgroupBroadcast(va7, 5u), bm, acc7);
            acc8 = block_fma(subgroupBroadcast(va8, 5u), bm, acc8); acc9 = block_fma(subgroupBroadcast(va9, 5u), bm, acc9);
            acc10 = block_fma(subgroupBroadcast(va10, 5u), bm, acc10); acc11 = block_fma(subgroupBroadcast(va11, 5u), bm, acc11);
            acc12 = block_fma(subgroupBroadcast(va12, 5u), bm, acc12); acc13 = block_fma(subgroupBroadcast(va13, 5u), bm, acc13);
            acc14 = block_fma(subgroupBroadcast(va14, 5u), bm, acc14); acc15 = block_fma(subgroupBroadcast(va15, 5u), bm, acc15);
            acc16 = block_fma(subgroupBroadcast(va16, 5u), bm, acc16); acc17 = block_fma(subgroupBroadcast(va17, 5u), bm, acc17);
            acc18 = block_fma(subgroupBroadcast(va18, 5u), bm, acc18); acc19 = block_fma(subgroupBroadcast(va19, 5u), bm, acc19);
            acc20 = block_fma(subgroupBroadcast(va20, 5u), bm, acc20); acc21 = block_fma(subgroupBroadcast(va21, 5u), bm, acc21);
            acc22 = block_fma(subgroupBroadcast(va22, 5u), bm, acc22); acc23 = block_fma(subgroupBroadcast(va23, 5u), bm, acc23);
            acc24 = block_fma(subgroupBroadcast(va24, 5u), bm, acc24); acc25 = block_fma(subgroupBroadcast(va25, 5u), bm, acc25);
            acc26 = block_fma(subgroupBroadcast(va26, 5u), bm, acc26); acc27 = block_fma(subgroupBroadcast(va27, 5u), bm, acc27);
            acc28 = block_fma(subgroupBroadcast(va28, 5u), bm, acc28); acc29 = block_fma(subgroupBroadcast(va29, 5u), bm, acc29);
            acc30 = block_fma(subgroupBroadcast(va30, 5u), bm, acc30); acc31 = block_fma(subgroupBroadcast(va31, 5u), bm, acc31);
        }
        {
            let bm = b_block(b_at, cg, (k4 + 6u) * 4u);
            acc0 = block_fma(subgroupBroadcast(va0, 6u), bm, acc0); acc1 = block_fma(subgroupBroadcast(va1, 6u), bm, acc1);
            acc2 = block_fma(subgroupBroadcast(va2, 6u), bm, acc2); acc3 = block_fma(subgroupBroadcast(va3, 6u), bm, acc3);
            acc4 = block_fma(subgroupBroadcast(va4, 6u), bm, acc4); acc5 = block_fma(subgroupBroadcast(va5, 6u), bm, acc5);
            acc6 = block_fma(subgroupBroadcast(va6, 6u), bm, acc6); acc7 = block_fma(subgroupBroadcast(va7, 6u), bm, acc7);
            acc8 = block_fma(subgroupBroadcast(va8, 6u), bm, acc8); acc9 = block_fma(subgroupBroadcast(va9, 6u), bm, acc9);
            acc10 = block_fma(subgroupBroadcast(va10, 6u), bm, acc10); acc11 = block_fma(subgroupBroadcast(va11, 6u), bm, acc11);
            acc12 = block_fma(subgroupBroadcast(va12, 6u), bm, acc12); acc13 = block_fma(subgroupBroadcast(va13, 6u), bm, acc13);
            acc14 = block_fma(subgroupBroadcast(va14, 6u), bm, acc14); acc15 = block_fma(subgroupBroadcast(va15, 6u), bm, acc15);
            acc16 = block_fma(subgroupBroadcast(va16, 6u), bm, acc16); acc17 = block_fma(subgroupBroadcast(va17, 6u), bm, acc17);
            acc18 = block_fma(subgroupBroadcast(va18, 6u), bm, acc18); acc19 = block_fma(subgroupBroadcast(va19, 6u), bm, acc19);
            acc20 = block_fma(subgroupBroadcast(va20, 6u), bm, acc20); acc21 = block_fma(subgroupBroadcast(va21, 6u), bm, acc21);
            acc22 = block_fma(subgroupBroadcast(va22, 6u), bm, acc22); acc23 = block_fma(subgroupBroadcast(va23, 6u), bm, acc23);
            acc24 = block_fma(subgroupBroadcast(va24, 6u), bm, acc24); acc25 = block_fma(subgroupBroadcast(va25, 6u), bm, acc25);
            acc26 = block_fma(subgroupBroadcast(va26, 6u), bm, acc26); acc27 = block_fma(subgroupBroadcast(va27, 6u), bm, acc27);
            acc28 = block_fma(subgroupBroadcast(va28, 6u), bm, acc28); acc29 = block_fma(subgroupBroadcast(va29, 6u), bm, acc29);
            acc30 = block_fma(subgroupBroadcast(va30, 6u), bm, acc30); acc31 = block_fma(subgroupBroadcast(va31, 6u), bm, acc31);
        }
        {
            let bm = b_block(b_at, cg, (k4 + 7u) * 4u);
            acc0 = block_fma(subgroupBroadcast(va0, 7u), bm, acc0); acc1 = block_fma(subgroupBroadcast(va1, 7u), bm, acc1);
            acc2 = block_fma(subgroupBroadcast(va2, 7u), bm, acc2); acc3 = block_fma(subgroupBroadcast(va3, 7u), bm, acc3);
            acc4 = block_fma(subgroupBroadcast(va4, 7u), bm, acc4); acc5 = block_fma(subgroupBroadcast(va5, 7u), bm, acc5);
            acc6 = block_fma(subgroupBroadcast(va6, 7u), bm, acc6); acc7 = block_fma(subgroupBroadcast(va7, 7u), bm, acc7);
            acc8 = block_fma(subgroupBroadcast(va8, 7u), bm, acc8); acc9 = block_fma(subgroupBroadcast(va9, 7u), bm, acc9);
            acc10 = block_fma(subgroupBroadcast(va10, 7u), bm, acc10); acc11 = block_fma(subgroupBroadcast(va11, 7u), bm, acc11);
            acc12 = block_fma(subgroupBroadcast(va12, 7u), bm, acc12); acc13 = block_fma(subgroupBroadcast(va13, 7u), bm, acc13);
            acc14 = block_fma(subgroupBroadcast(va14, 7u), bm, acc14); acc15 = block_fma(subgroupBroadcast(va15, 7u), bm, acc15);
            acc16 = block_fma(subgroupBroadcast(va16, 7u), bm, acc16); acc17 = block_fma(subgroupBroadcast(va17, 7u), bm, acc17);
            acc18 = block_fma(subgroupBroadcast(va18, 7u), bm, acc18); acc19 = block_fma(subgroupBroadcast(va19, 7u), bm, acc19);
            acc20 = block_fma(subgroupBroadcast(va20, 7u), bm, acc20); acc21 = block_fma(subgroupBroadcast(va21, 7u), bm, acc21);
            acc22 = block_fma(subgroupBroadcast(va22, 7u), bm, acc22); acc23 = block_fma(subgroupBroadcast(va23, 7u), bm, acc23);
            acc24 = block_fma(subgroupBroadcast(va24, 7u), bm, acc24); acc25 = block_fma(subgroupBroadcast(va25, 7u), bm, acc25);
            acc26 = block_fma(subgroupBroadcast(va26, 7u), bm, acc26); acc27 = block_fma(subgroupBroadcast(va27, 7u), bm, acc27);
            acc28 = block_fma(subgroupBroadcast(va28, 7u), bm, acc28); acc29 = block_fma(subgroupBroadcast(va29, 7u), bm, acc29);
            acc30 = block_fma(subgroupBroadcast(va30, 7u), bm, acc30); acc31 = block_fma(subgroupBroadcast(va31, 7u), bm, acc31);
        }
    }
    let col0 = group * 4u;
    if col0 < dims.n {
        let c_base = batch_base(z, dims.c_offset, dims.c_outer, dims.c_inner, 1u);
        store_row4(c_base, row0 + 0u, col0, acc0); store_row4(c_base, row0 + 1u, col0, acc1);
        store_row4(c_base, row0 + 2u, col0, acc2); store_row4(c_base, row0 + 3u, col0, acc3);
        store_row4(c_base, row0 + 4u, col0, acc4); store_row4(c_base, row0 + 5u, col0, acc5);
        store_row4(c_base, row0 + 6u, col0, acc6); store_row4(c_base, row0 + 7u, col0, acc7);
        store_row4(c_base, row0 + 8u, col0, acc8); store_row4(c_base, row0 + 9u, col0, acc9);
        store_row4(c_base, row0 + 10u, col0, acc10); store_row4(c_base, row0 + 11u, col0, acc11);
        store_row4(c_base, row0 + 12u, col0, acc12); store_row4(c_base, row0 + 13u, col0, acc13);
        store_row4(c_base, row0 + 14u, col0, acc14); store_row4(c_base, row0 + 15u, col0, acc15);
        store_row4(c_base, row0 + 16u, col0, acc16); store_row4(c_base, row0 + 17u, col0, acc17);
        store_row4(c_base, row0 + 18u, col0, acc18); store_row4(c_base, row0 + 19u, col0, acc19);
        store_row4(c_base, row0 + 20u, col0, acc20); store_row4(c_base, row0 + 21u, col0, acc21);
        store_row4(c_base, row0 + 22u, col0, acc22); store_row4(c_base, row0 + 23u, col0, acc23);
        store_row4(c_base, row0 + 24u, col0, acc24); store_row4(c_base, row0 + 25u, col0, acc25);
        store_row4(c_base, row0 + 26u, col0, acc26); store_row4(c_base, row0 + 27u, col0, acc27);
        store_row4(c_base, row0 + 28u, col0, acc28); store_row4(c_base, row0 + 29u, col0, acc29);
        store_row4(c_base, row0 + 30u, col0, acc30); store_row4(c_base, row0 + 31u, col0, acc31);
    }
}
