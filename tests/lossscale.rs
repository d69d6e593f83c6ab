//! The lossscale family: the GPU's scale update follows the CPU reference step for step through
//! overflows, growth and both bounds.

mod common;

use common::gpu;
use kiln::Precision;
use kiln::cpu::lossscale::loss_scale_update;
use kiln::gpu::DType;
use kiln::kernels::lossscale::LossScaler;
use kiln::training::LossScaling;

#[test]
fn gpu_scale_update_matches_cpu() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let settings = LossScaling {
        init_scale: 8.0,
        growth_interval: 3,
        min_scale: 0.5,
        max_scale: 64.0,
        ..LossScaling::default()
    };
    let scale = gpu.upload("scale", &[1], DType::F32, &[8.0]).unwrap();
    let run = gpu.upload_u32("run", &[1], &[0]).unwrap();
    let flag = gpu.upload_u32("flag", &[1], &[0]).unwrap();
    let scaler = LossScaler::new(gpu, &scale, &run, &flag, &settings).unwrap();
    // Overflows down to the floor, clean runs up to the ceiling, and an overflow mid-run that
    // restarts the count: 0.5 after 4 overflows (and stays), 1 after 3 clean steps, 0.5 again,
    // then 27 clean steps grow it 9 times, past the ceiling of 64.
    let mut flags = vec![1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1];
    flags.extend([0; 27]);
    let (mut s, mut r) = (8.0f32, 0u32);
    let mut seen = Vec::new();
    for (i, &f) in flags.iter().enumerate() {
        gpu.write_u32(&flag, &[f]).unwrap();
        scaler.run(gpu).unwrap();
        loss_scale_update(&mut s, &mut r, f, &settings);
        let got = (gpu.read(&scale).unwrap()[0], gpu.read_u32(&run).unwrap()[0]);
        assert_eq!(got, (s, r), "step {i} (flag {f})");
        seen.push(s);
    }
    assert!(seen.contains(&0.5), "never reached the floor: {seen:?}");
    assert_eq!(*seen.last().unwrap(), 64.0, "never reached the ceiling");
}

#[test]
fn bad_settings_are_refused() {
    let Some(gpu) = gpu(Precision::F32) else {
        return;
    };
    let scale = gpu.upload("scale", &[1], DType::F32, &[1.0]).unwrap();
    let run = gpu.upload_u32("run", &[1], &[0]).unwrap();
    let flag = gpu.upload_u32("flag", &[1], &[0]).unwrap();
    for (settings, key) in [
        (
            LossScaling {
                backoff_factor: 1.5,
                ..LossScaling::default()
            },
            "backoff_factor",
        ),
        (
            LossScaling {
                growth_interval: 0,
                ..LossScaling::default()
            },
            "growth_interval",
        ),
        (
            LossScaling {
                init_scale: f32::INFINITY,
                ..LossScaling::default()
            },
            "init_scale",
        ),
    ] {
        let e = LossScaler::new(gpu, &scale, &run, &flag, &settings)
            .err()
            .unwrap_or_else(|| panic!("{key} accepted"))
            .to_string();
        assert!(e.contains(key), "{e}");
    }
    // The scale tensor must be f32.
    let e = LossScaler::new(gpu, &run, &run, &flag, &LossScaling::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("scale"), "{e}");
}
