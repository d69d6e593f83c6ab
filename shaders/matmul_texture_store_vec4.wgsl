// How matmul_texture writes an invocation's four columns of one row of C when C is 4-aligned
// (N, the leading dimension, the offset and the batch strides of C all multiples of 4, and the
// bias offset too): as one vec4 per operand. On a CPU-backed adapter such as lavapipe every
// storage access is a loop over the SIMD lanes with a bounds check per lane, and a vec4 access
// makes one trip for four elements where four scalar accesses make four: writing a 768 x 512 C
// this way took about a fifth off the multiply. The arithmetic is store_c's (matmul.wgsl),
// element for element in the same order, so the result is bit-identical to the scalar path.

// Vec4 views of store_c's operands, bound to the same buffers.
@group(0) @binding(13) var<storage, read> bias4: array<vec4<T>>;
@group(0) @binding(14) var<storage, read_write> c4: array<vec4<T>>;
@group(0) @binding(15) var<storage, read> resid4: array<vec4<T>>;
@group(0) @binding(16) var<storage, read_write> gelu_out4: array<vec4<T>>;
@group(0) @binding(17) var<storage, read> gelu_in4: array<vec4<T>>;

fn gelu4(x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(gelu(x.x), gelu(x.y), gelu(x.z), gelu(x.w));
}

fn gelu_grad4(x: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(gelu_grad(x.x), gelu_grad(x.y), gelu_grad(x.z), gelu_grad(x.w));
}

fn store_row4(c_base: u32, row: u32, col0: u32, acc: vec4<f32>) {
    if row >= dims.m {
        return;
    }
    var v = dims.alpha * acc;
    if HAS_BIAS {
        v += vec4<f32>(bias4[(dims.bias_offset + col0) / 4u]);
    }
    let i = (c_base + row * dims.ldc + col0) / 4u;
    if HAS_RESIDUAL {
        v = vec4<f32>(resid4[i]) + v;
    }
    if ACCUMULATE {
        v += vec4<f32>(c4[i]);
    }
    if EPILOGUE == 2u {
        v = vec4<f32>(vec4<T>(v)) * gelu_grad4(vec4<f32>(gelu_in4[i]));
    }
    let stored = vec4<T>(v);
    c4[i] = stored;
    if EPILOGUE == 1u {
        gelu_out4[i] = vec4<T>(gelu4(vec4<f32>(stored)));
    }
}
