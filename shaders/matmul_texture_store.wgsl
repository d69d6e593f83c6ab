// How matmul_texture writes an invocation's four columns of one row of C: element by element
// through store_c (matmul.wgsl), for any layout of C. matmul_texture_store_vec4.wgsl is the
// alternative for a C whose rows and batch entries start at multiples of 4 elements; the host
// compiles the texture kernel with one or the other.

fn store_row4(c_base: u32, row: u32, col0: u32, v: vec4<f32>) {
    if row < dims.m {
        for (var j = 0u; j < 4u; j++) {
            if col0 + j < dims.n {
                store_c(c_base, row, col0 + j, v[j]);
            }
        }
    }
}
