// Batched matrix multiply with f32 accumulation:
//
//     C[z] = alpha * op(A[z]) * op(B[z])  (+ bias broadcast over rows)  (+ C[z] when ACCUMULATE)
//
// op(A) is M x K and op(B) is K x N. A is stored M x K (row-major, row stride lda) or, with
// TRANS_A, K x M; B is stored K x N or, with TRANS_B, N x K. The three products of a linear layer
// are then:  Y = X W^T (TRANS_B),  dX = dY W (plain),  dW = dY^T X (TRANS_A, with ACCUMULATE to sum
// gradients over micro-batches).
//
// Batches: z runs over dims.batch; z = outer * batch_inner + inner, and each operand's base is
// offset + outer * *_outer + (inner / *_inner_div) * *_inner (in elements). Attention's
// (batch, head) products use both levels to address heads inside a (B, T, C) activation without
// copies; the divisor (1 except for A and B in grouped-query attention, where query head h reads
// key/value head h / group) lets several inner indices share one operand matrix. C's divisor is
// always 1: two batches never write the same matrix.
//
// T, the storage type, is defined by a prelude line put in front of this file at pipeline
// creation (`alias T = f32;` or `enable f16; alias T = f16;`).
//
// Three entry points, one maths:
//   matmul_tiled       workgroup-memory tiles with a 4x4 register block per invocation; the
//                      layout real GPUs want (global loads coalesced, each operand element read
//                      from global memory once per tile).
//   matmul_tiled_vec4  the same with vec4 global loads, when the contiguous extents and strides are
//                      multiples of 4.
//   matmul_rows        no workgroup memory and no barriers: each invocation keeps a column of
//                      ROWS accumulators in registers and reads A and B straight from global
//                      memory. Barriers are expensive on CPU-backed adapters such as lavapipe,
//                      where this wins; the runtime picks between them by measurement.

struct Dims {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    batch_inner: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    a_outer: u32,
    a_inner: u32,
    b_outer: u32,
    b_inner: u32,
    c_outer: u32,
    c_inner: u32,
    a_offset: u32,
    b_offset: u32,
    c_offset: u32,
    bias_offset: u32,
    alpha: f32,
    a_inner_div: u32,
    b_inner_div: u32,
    // Causal structure the kernels skip (MatmulSpec::triangle; see k_range and skips_block): 0
    // none, 1 only C on and below the diagonal wanted, 2 op(A) zero past the diagonal, 3 op(A)
    // zero before it.
    triangle: u32,
    // Where batch entry z's operand sits in its packed texture (matmul_texture.wgsl): layer
    // z / tex_div, texels from x = ((z % tex_div) / inner_div) * tex_step on. 1 and 0 for a
    // texture of one layer per batch entry.
    a_tex_div: u32,
    a_tex_step: u32,
    b_tex_div: u32,
    b_tex_step: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<T>;
@group(0) @binding(2) var<storage, read> b: array<T>;
@group(0) @binding(3) var<storage, read> bias: array<T>;
@group(0) @binding(4) var<storage, read_write> c: array<T>;
// A tensor laid out like C, added in the epilogue when HAS_RESIDUAL: a transformer's residual
// stream, so `out = x + proj(h)` is one product instead of a product and an element-wise pass.
@group(0) @binding(10) var<storage, read> resid: array<T>;
// GELU epilogue (EPILOGUE, gelu.wgsl): with 1, gelu(C) is also written to `gelu_out` (the MLP's
// activation beside its pre-activation C); with 2, C becomes C ⊙ gelu'(gelu_in) (the MLP's
// hidden gradient from dA = dY·W and the saved pre-activation). Both laid out like C.
@group(0) @binding(11) var<storage, read_write> gelu_out: array<T>;
@group(0) @binding(12) var<storage, read> gelu_in: array<T>;
// The same buffers as `a` and `b`, viewed four elements at a time (matmul_tiled_vec4 only).
@group(0) @binding(5) var<storage, read> a4: array<vec4<T>>;
@group(0) @binding(6) var<storage, read> b4: array<vec4<T>>;

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override HAS_BIAS: bool = false;
override ACCUMULATE: bool = false;
override HAS_RESIDUAL: bool = false;
override EPILOGUE: u32 = 0u;

// Tile of C computed by one workgroup of the tiled kernels, and the depth of one K step.
override TILE_M: u32 = 64u;
override TILE_N: u32 = 64u;
override TILE_K: u32 = 16u;
// Register block of the tiled kernels: each invocation owns a 4 x 4 patch of C, as four vec4 rows.
const RM: u32 = 4u;

// Workgroup of matmul_rows: ROWS_WG_X invocations along N, all on the same block of rows.
override ROWS_WG_X: u32 = 64u;
// Rows of C per matmul_rows invocation (a function-scope array needs a constant size).
const ROWS: u32 = 32u;

fn batch_base(z: u32, offset: u32, outer: u32, inner: u32, inner_div: u32) -> u32 {
    return offset + (z / dims.batch_inner) * outer + ((z % dims.batch_inner) / inner_div) * inner;
}

// The K range that rows row0 .. row0 + rows - 1 of C need under the causal hint (Dims.triangle):
// with op(A) zero past the diagonal it ends at row0 + rows, with op(A) zero before it it starts at
// row0. Every kernel sums in increasing k, so dropping exact zero terms at either end leaves each
// sum bit for bit what the full one is (a sum that starts at +0 stays +0 through ±0 terms).
fn k_range(row0: u32, rows: u32) -> vec2<u32> {
    var r = vec2<u32>(0u, dims.k);
    if dims.triangle == 2u {
        r.y = min(dims.k, row0 + rows);
    }
    if dims.triangle == 3u {
        r.x = min(row0, dims.k);
    }
    return r;
}

// Whether a workgroup's block of C (rows row0 .. row0 + rows - 1, columns from col0) lies wholly
// above the diagonal, where the hint that only C on and below it is wanted lets it do nothing.
// Decided from workgroup-uniform values, so the early return keeps barriers and subgroup
// operations in uniform control flow. Blocks are 32 or 64 rows and start on multiples of 32, so
// what is left unwritten is whole 32 x 32 blocks strictly above the diagonal.
fn skips_block(row0: u32, rows: u32, col0: u32) -> bool {
    return dims.triangle == 1u && col0 >= row0 + rows;
}

// Index of op(A)[row, kk].
fn a_index(base: u32, row: u32, kk: u32) -> u32 {
    if TRANS_A {
        return base + kk * dims.lda + row;
    }
    return base + row * dims.lda + kk;
}

// Index of op(B)[kk, col].
fn b_index(base: u32, kk: u32, col: u32) -> u32 {
    if TRANS_B {
        return base + col * dims.ldb + kk;
    }
    return base + kk * dims.ldb + col;
}

// Writes one element of C: scale, bias, residual, accumulate, GELU epilogue, round to T. The residual is added
// to the finished product exactly as the separate residual kernel would add it (x + y in f32),
// so in f32 the fused result is bit-identical to the product followed by that kernel; in f16 it
// skips the product's rounding to T before the sum.
fn store_c(c_base: u32, row: u32, col: u32, acc: f32) {
    var v = dims.alpha * acc;
    if HAS_BIAS {
        v += f32(bias[dims.bias_offset + col]);
    }
    let i = c_base + row * dims.ldc + col;
    if HAS_RESIDUAL {
        v = f32(resid[i]) + v;
    }
    if ACCUMULATE {
        v += f32(c[i]);
    }
    // The product is rounded to T before the GELU step, as storing it and running the activation
    // kernel on it would round it, so the fused result is bit-identical to the two passes.
    if EPILOGUE == 2u {
        v = f32(T(v)) * gelu_grad(f32(gelu_in[i]));
    }
    let stored = T(v);
    c[i] = stored;
    if EPILOGUE == 1u {
        gelu_out[i] = T(gelu(f32(stored)));
    }
}

// ---------------------------------------------------------------------------------------------
// Tiled kernels. Tiles are stored K-major (tile[kk][m] and tile[kk][n]) as vec4 so that the inner
// loop reads one vec4 of A and one of B per k and does 16 FMAs with them.

var<workgroup> a_tile: array<vec4<f32>, TILE_K * TILE_M / 4u>;
var<workgroup> b_tile: array<vec4<f32>, TILE_K * TILE_N / 4u>;

fn tile_put(is_a: bool, s: u32, v: f32) {
    if is_a {
        a_tile[s / 4u][s % 4u] = v;
    } else {
        b_tile[s / 4u][s % 4u] = v;
    }
}

// Multiplies the two staged tiles into the invocation's 4 x 4 patch.
fn tile_multiply(lid: vec3<u32>, acc: ptr<function, array<vec4<f32>, RM>>) {
    for (var kk = 0u; kk < TILE_K; kk++) {
        let av = a_tile[kk * (TILE_M / 4u) + lid.y];
        let bv = b_tile[kk * (TILE_N / 4u) + lid.x];
        (*acc)[0] = fma(vec4<f32>(av.x), bv, (*acc)[0]);
        (*acc)[1] = fma(vec4<f32>(av.y), bv, (*acc)[1]);
        (*acc)[2] = fma(vec4<f32>(av.z), bv, (*acc)[2]);
        (*acc)[3] = fma(vec4<f32>(av.w), bv, (*acc)[3]);
    }
}

fn tile_store(z: u32, row0: u32, col0: u32, acc: array<vec4<f32>, RM>) {
    let c_base = batch_base(z, dims.c_offset, dims.c_outer, dims.c_inner, 1u);
    for (var r = 0u; r < RM; r++) {
        let row = row0 + r;
        if row >= dims.m {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + j;
            if col < dims.n {
                store_c(c_base, row, col, acc[r][j]);
            }
        }
    }
}

@compute @workgroup_size(TILE_N / 4u, TILE_M / RM, 1)
fn matmul_tiled(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let z = wg.z;
    let row0 = wg.y * TILE_M;
    let col0 = wg.x * TILE_N;
    let a_base = batch_base(z, dims.a_offset, dims.a_outer, dims.a_inner, dims.a_inner_div);
    let b_base = batch_base(z, dims.b_offset, dims.b_outer, dims.b_inner, dims.b_inner_div);
    let threads = (TILE_N / 4u) * (TILE_M / RM);
    var acc: array<vec4<f32>, RM>;
    if skips_block(row0, TILE_M, col0) {
        return;
    }
    let ks = k_range(row0, TILE_M);

    for (var k0 = ks.x; k0 < ks.y; k0 += TILE_K) {
        // Consecutive invocations walk the operand's contiguous dimension, so loads coalesce.
        for (var i = tid; i < TILE_M * TILE_K; i += threads) {
            var mm = i / TILE_K;
            var kk = i % TILE_K;
            if TRANS_A {
                mm = i % TILE_M;
                kk = i / TILE_M;
            }
            let row = row0 + mm;
            let kg = k0 + kk;
            var v = 0.0;
            if row < dims.m && kg < dims.k {
                v = f32(a[a_index(a_base, row, kg)]);
            }
            tile_put(true, kk * TILE_M + mm, v);
        }
        for (var i = tid; i < TILE_N * TILE_K; i += threads) {
            var nn = i % TILE_N;
            var kk = i / TILE_N;
            if TRANS_B {
                nn = i / TILE_K;
                kk = i % TILE_K;
            }
            let col = col0 + nn;
            let kg = k0 + kk;
            var v = 0.0;
            if col < dims.n && kg < dims.k {
                v = f32(b[b_index(b_base, kg, col)]);
            }
            tile_put(false, kk * TILE_N + nn, v);
        }
        workgroupBarrier();
        tile_multiply(lid, &acc);
        workgroupBarrier();
    }
    tile_store(z, row0 + lid.y * RM, col0 + lid.x * 4u, acc);
}

// Vec4 global loads. The host picks this entry only when each operand's contiguous extent
// (K or M for A, N or K for B), its leading dimension, batch strides and offset are multiples
// of 4, so a vec4 never straddles a row or the end of a matrix.
@compute @workgroup_size(TILE_N / 4u, TILE_M / RM, 1)
fn matmul_tiled_vec4(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let z = wg.z;
    let row0 = wg.y * TILE_M;
    let col0 = wg.x * TILE_N;
    let a_base = batch_base(z, dims.a_offset, dims.a_outer, dims.a_inner, dims.a_inner_div);
    let b_base = batch_base(z, dims.b_offset, dims.b_outer, dims.b_inner, dims.b_inner_div);
    let threads = (TILE_N / 4u) * (TILE_M / RM);
    var acc: array<vec4<f32>, RM>;
    if skips_block(row0, TILE_M, col0) {
        return;
    }
    let ks = k_range(row0, TILE_M);

    for (var k0 = ks.x; k0 < ks.y; k0 += TILE_K) {
        for (var i = tid; i < TILE_M * TILE_K / 4u; i += threads) {
            // (mm, kk) is the first of four consecutive elements along the contiguous dimension.
            var mm = i / (TILE_K / 4u);
            var kk = (i % (TILE_K / 4u)) * 4u;
            if TRANS_A {
                mm = (i % (TILE_M / 4u)) * 4u;
                kk = i / (TILE_M / 4u);
            }
            let row = row0 + mm;
            let kg = k0 + kk;
            var v = vec4<f32>(0.0);
            if row < dims.m && kg < dims.k {
                v = vec4<f32>(a4[a_index(a_base, row, kg) / 4u]);
            }
            for (var j = 0u; j < 4u; j++) {
                if TRANS_A {
                    tile_put(true, kk * TILE_M + mm + j, v[j]);
                } else {
                    tile_put(true, (kk + j) * TILE_M + mm, v[j]);
                }
            }
        }
        for (var i = tid; i < TILE_N * TILE_K / 4u; i += threads) {
            var nn = (i % (TILE_N / 4u)) * 4u;
            var kk = i / (TILE_N / 4u);
            if TRANS_B {
                nn = i / (TILE_K / 4u);
                kk = (i % (TILE_K / 4u)) * 4u;
            }
            let col = col0 + nn;
            let kg = k0 + kk;
            var v = vec4<f32>(0.0);
            if col < dims.n && kg < dims.k {
                v = vec4<f32>(b4[b_index(b_base, kg, col) / 4u]);
            }
            for (var j = 0u; j < 4u; j++) {
                if TRANS_B {
                    tile_put(false, (kk + j) * TILE_N + nn, v[j]);
                } else {
                    tile_put(false, kk * TILE_N + nn + j, v[j]);
                }
            }
        }
        workgroupBarrier();
        tile_multiply(lid, &acc);
        workgroupBarrier();
    }
    tile_store(z, row0 + lid.y * RM, col0 + lid.x * 4u, acc);
}

// ---------------------------------------------------------------------------------------------
// Register-blocked kernel without workgroup memory. Neighbouring invocations take neighbouring
// columns, so B loads (plain layout) are contiguous across a SIMD row and A loads are the same
// address across it, which CPU-backed adapters turn into one vector load and one broadcast.
// The 32 accumulators are eight named vec4s rather than an array: an indexed array can end up in
// memory instead of registers.

// Four rows of op(A) at column kk, starting at `row`; rows past M are clamped to M - 1 (their
// results are never stored), so the loop has no branch.
fn a_col4(a_base: u32, row: u32, kk: u32) -> vec4<f32> {
    let last = dims.m - 1u;
    return vec4<f32>(
        f32(a[a_index(a_base, min(row, last), kk)]),
        f32(a[a_index(a_base, min(row + 1u, last), kk)]),
        f32(a[a_index(a_base, min(row + 2u, last), kk)]),
        f32(a[a_index(a_base, min(row + 3u, last), kk)]),
    );
}

fn store_c4(c_base: u32, row: u32, col: u32, v: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        if row + j < dims.m {
            store_c(c_base, row + j, col, v[j]);
        }
    }
}

@compute @workgroup_size(ROWS_WG_X, 1, 1)
fn matmul_rows(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    // The row block comes from the workgroup id alone, so every address into A is provably the
    // same for the whole workgroup: SIMD compilers (lavapipe's) load it once and broadcast it.
    // Columns past N are clamped rather than returned early: code after a divergent branch runs
    // under a lane mask, and masked loads become slow gathers on CPU-backed adapters.
    let col = min(gid.x, dims.n - 1u);
    let row0 = wg.y * ROWS;
    let z = wg.z;
    let a_base = batch_base(z, dims.a_offset, dims.a_outer, dims.a_inner, dims.a_inner_div);
    let b_base = batch_base(z, dims.b_offset, dims.b_outer, dims.b_inner, dims.b_inner_div);
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    // Element (row0 + r, kk) of op(A) sits at a0 + r * rs + kk * ks.
    var rs = dims.lda;
    var ks = 1u;
    if TRANS_A {
        rs = 1u;
        ks = dims.lda;
    }
    if skips_block(row0, ROWS, wg.x * ROWS_WG_X) {
        return;
    }
    let kr = k_range(row0, ROWS);
    if row0 + ROWS <= dims.m {
        for (var kk = kr.x; kk < kr.y; kk++) {
            let bv = vec4<f32>(f32(b[b_index(b_base, kk, col)]));
            let i = a_base + row0 * rs + kk * ks;
            acc0 = fma(vec4<f32>(f32(a[i]), f32(a[i + rs]), f32(a[i + 2u * rs]), f32(a[i + 3u * rs])), bv, acc0);
            let i1 = i + 4u * rs;
            acc1 = fma(vec4<f32>(f32(a[i1]), f32(a[i1 + rs]), f32(a[i1 + 2u * rs]), f32(a[i1 + 3u * rs])), bv, acc1);
            let i2 = i1 + 4u * rs;
            acc2 = fma(vec4<f32>(f32(a[i2]), f32(a[i2 + rs]), f32(a[i2 + 2u * rs]), f32(a[i2 + 3u * rs])), bv, acc2);
            let i3 = i2 + 4u * rs;
            acc3 = fma(vec4<f32>(f32(a[i3]), f32(a[i3 + rs]), f32(a[i3 + 2u * rs]), f32(a[i3 + 3u * rs])), bv, acc3);
            let i4 = i3 + 4u * rs;
            acc4 = fma(vec4<f32>(f32(a[i4]), f32(a[i4 + rs]), f32(a[i4 + 2u * rs]), f32(a[i4 + 3u * rs])), bv, acc4);
            let i5 = i4 + 4u * rs;
            acc5 = fma(vec4<f32>(f32(a[i5]), f32(a[i5 + rs]), f32(a[i5 + 2u * rs]), f32(a[i5 + 3u * rs])), bv, acc5);
            let i6 = i5 + 4u * rs;
            acc6 = fma(vec4<f32>(f32(a[i6]), f32(a[i6 + rs]), f32(a[i6 + 2u * rs]), f32(a[i6 + 3u * rs])), bv, acc6);
            let i7 = i6 + 4u * rs;
            acc7 = fma(vec4<f32>(f32(a[i7]), f32(a[i7 + rs]), f32(a[i7 + 2u * rs]), f32(a[i7 + 3u * rs])), bv, acc7);
        }
    } else {
        for (var kk = kr.x; kk < kr.y; kk++) {
            let bv = vec4<f32>(f32(b[b_index(b_base, kk, col)]));
            acc0 = fma(a_col4(a_base, row0, kk), bv, acc0);
            acc1 = fma(a_col4(a_base, row0 + 4u, kk), bv, acc1);
            acc2 = fma(a_col4(a_base, row0 + 8u, kk), bv, acc2);
            acc3 = fma(a_col4(a_base, row0 + 12u, kk), bv, acc3);
            acc4 = fma(a_col4(a_base, row0 + 16u, kk), bv, acc4);
            acc5 = fma(a_col4(a_base, row0 + 20u, kk), bv, acc5);
            acc6 = fma(a_col4(a_base, row0 + 24u, kk), bv, acc6);
            acc7 = fma(a_col4(a_base, row0 + 28u, kk), bv, acc7);
        }
    }
    if gid.x >= dims.n {
        return;
    }
    let c_base = batch_base(z, dims.c_offset, dims.c_outer, dims.c_inner, 1u);
    store_c4(c_base, row0, col, acc0);
    store_c4(c_base, row0 + 4u, col, acc1);
    store_c4(c_base, row0 + 8u, col, acc2);
    store_c4(c_base, row0 + 12u, col, acc3);
    store_c4(c_base, row0 + 16u, col, acc4);
    store_c4(c_base, row0 + 20u, col, acc5);
    store_c4(c_base, row0 + 24u, col, acc6);
    store_c4(c_base, row0 + 28u, col, acc7);
}
