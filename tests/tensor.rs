//! Tensors and views: upload, read-back and kernels on part of a buffer.

mod common;

use common::gpu;
use kiln::Precision;
use kiln::gpu::DType;
use kiln::kernels::matmul::Matmul;
use kiln::ops::{Layout, MatmulSpec};

#[test]
fn round_trips_in_every_dtype() {
    let gpu = gpu(Precision::F32).unwrap();
    let v: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
    for dt in [DType::F32, DType::F16] {
        let t = gpu.upload("t", &[37], dt, &v).unwrap();
        // Quarter steps up to 6 are exact in f16.
        assert_eq!(gpu.read(&t).unwrap(), v, "{dt:?}");
    }
    let u: Vec<u32> = (0..5).map(|i| i * 1_000_000_007 % 4_000_000_000).collect();
    let t = gpu.upload_u32("u", &[5], &u).unwrap();
    assert_eq!(gpu.read_u32(&t).unwrap(), u);
    let e = gpu.upload("bad", &[4], DType::F32, &[1.0; 3]).unwrap_err();
    assert!(e.to_string().contains("3 values were given"), "{e}");
}

/// The minimum storage offset alignment in elements of `dt`.
fn align(gpu: &kiln::Gpu, dt: DType) -> usize {
    gpu.capabilities()
        .limits
        .min_storage_buffer_offset_alignment as usize
        / dt.size()
}

#[test]
fn views_write_and_read_only_their_range() {
    let gpu = gpu(Precision::F32).unwrap();
    for dt in [DType::F32, DType::F16] {
        let a = align(gpu, dt);
        let whole = gpu
            .upload("whole", &[4 * a], dt, &vec![7.0; 4 * a])
            .unwrap();
        // An odd length in f16 ends mid-word: the neighbour's element must survive the write.
        let view = whole.view("part", a, &[a - 1]).unwrap();
        gpu.write(&view, &vec![1.5; a - 1]).unwrap();
        let all = gpu.read(&whole).unwrap();
        assert!(
            all[..a].iter().all(|&x| x == 7.0),
            "{dt:?}: before the view"
        );
        assert!(
            all[a..2 * a - 1].iter().all(|&x| x == 1.5),
            "{dt:?}: the view"
        );
        assert!(
            all[2 * a - 1..].iter().all(|&x| x == 7.0),
            "{dt:?}: after the view"
        );
        assert_eq!(gpu.read(&view).unwrap(), vec![1.5; a - 1]);
        assert!(whole.view("oob", 3 * a, &[a + 1]).is_err());
    }
}

#[test]
fn kernels_write_through_views_without_touching_neighbours() {
    let gpu = gpu(Precision::F32).unwrap();
    let a = align(gpu, DType::F32).max(16);
    // C = A·B for 3×5 · 5×2 into the second aligned slot of a larger buffer.
    let spec = MatmulSpec::new(Layout::NN, 3, 2, 5);
    let av: Vec<f32> = (0..15).map(|i| i as f32).collect();
    let bv: Vec<f32> = (0..10).map(|i| 1.0 - i as f32 * 0.5).collect();
    let big = gpu
        .upload("big", &[3 * a], DType::F32, &vec![-9.0; 3 * a])
        .unwrap();
    let c = big.view("c", a, &[6]).unwrap();
    let (ga, gb) = (
        gpu.upload("a", &[15], DType::F32, &av).unwrap(),
        gpu.upload("b", &[10], DType::F32, &bv).unwrap(),
    );
    Matmul::new(gpu, &c, &ga, &gb, None, &spec)
        .unwrap()
        .run(gpu)
        .unwrap();
    let mut want = vec![0.0; 6];
    kiln::cpu::matmul::matmul(&mut want, &av, &bv, None, &spec).unwrap();
    assert_eq!(gpu.read(&c).unwrap(), want);
    let all = gpu.read(&big).unwrap();
    assert!(all[..a].iter().chain(&all[a + 6..]).all(|&x| x == -9.0));
}
