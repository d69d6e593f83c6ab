//! The `kiln` command as a user runs it.

use std::process::Command;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn info_lists_adapters_and_the_choice() {
    let out = kiln().arg("info").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("adapters found:"), "{stdout}");
    assert!(stdout.contains("selected: ["), "{stdout}");
    assert!(stdout.contains("SHADER_F16:"), "{stdout}");
    assert!(
        stdout.contains("max_storage_buffer_binding_size"),
        "{stdout}"
    );
}

#[test]
fn unknown_adapter_is_a_clear_error() {
    let out = kiln()
        .args(["--adapter", "no-such-gpu-xyz", "info"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no adapter matches \"no-such-gpu-xyz\""),
        "{stderr}"
    );
    assert!(stderr.contains("adapters found"), "{stderr}");
}

#[test]
fn bench_matmul_prints_one_json_line() {
    let out = kiln()
        .args([
            "--precision",
            "f32",
            "bench",
            "matmul",
            "--size",
            "48",
            "--runs",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(line["op"], "matmul");
    assert_eq!(line["m"], 48);
    assert_eq!(line["precision"], "f32");
    assert!(line["gpu_gflops"].as_f64().unwrap() > 0.0);
    assert!(line["cpu_ref_gflops"].as_f64().unwrap() > 0.0);
    assert!(line["max_abs_err"].as_f64().unwrap() < 1e-4, "{line}");
    assert!(line["adapter"].as_str().is_some());
}

/// With every Vulkan and EGL driver hidden there is no adapter: the command must say so, name
/// the fix and exit non-zero, without a panic.
#[cfg(target_os = "linux")]
#[test]
fn no_driver_is_a_clear_error() {
    let out = kiln()
        .arg("info")
        .env("VK_ICD_FILENAMES", "/nonexistent")
        .env("VK_DRIVER_FILES", "/nonexistent")
        .env("__EGL_VENDOR_LIBRARY_FILENAMES", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no GPU adapter found"), "{stderr}");
    assert!(stderr.contains("mesa-vulkan-drivers"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Where the only adapter is OpenGL (Vulkan hidden), kiln must fall back to f32 and still compute
/// correct products: the path for adapters that really lack SHADER_F16 and subgroups.
#[cfg(target_os = "linux")]
#[test]
fn gl_adapter_without_f16_falls_back_to_f32() {
    let out = kiln()
        .args(["bench", "matmul", "--size", "40", "--runs", "1", "--json"])
        .env("VK_ICD_FILENAMES", "/nonexistent")
        .env("VK_DRIVER_FILES", "/nonexistent")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("no GPU adapter found") {
        eprintln!("note: no OpenGL adapter on this machine; GL fallback not exercised");
        return;
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(line["precision"], "f32", "{line}");
    assert!(line["adapter"].as_str().is_some());
    // Inputs in [-1, 1), K = 40: f32 results agree with the reference far below 1e-4.
    assert!(line["max_abs_err"].as_f64().unwrap() < 1e-4, "{line}");
}

/// With no Vulkan driver, kiln falls back to llvmpipe through OpenGL, about 100x slower: it must
/// say so and name the package that fixes it, and `kiln info` says what it searched.
#[cfg(target_os = "linux")]
#[test]
fn gl_fallback_says_what_to_install() {
    let out = kiln()
        .arg("info")
        .env("VK_ICD_FILENAMES", "/nonexistent")
        .env("VK_DRIVER_FILES", "/nonexistent")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("no GPU adapter found") {
        eprintln!("note: no OpenGL adapter on this machine; GL fallback not exercised");
        return;
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("backends searched:"), "{stdout}");
    assert!(stdout.contains("GL: 1 adapter"), "{stdout}");
    for text in [&stdout, &stderr] {
        assert!(
            text.contains("through OpenGL") && text.contains("mesa-vulkan-drivers"),
            "{text}"
        );
    }
}

/// Mesa's device-select layer used to print "XDG_RUNTIME_DIR is invalid or not set" twice for
/// every command on a headless machine.
#[test]
fn a_headless_terminal_stays_free_of_mesa_noise() {
    let out = kiln()
        .arg("info")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
    if stdout.contains("(Vulkan,") {
        assert!(stdout.contains("GL: not searched"), "{stdout}");
    }
}

/// The help promises only what exists.
#[test]
fn help_promises_no_fine_tuning_yet() {
    let out = kiln().arg("--help").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!stdout.to_lowercase().contains("fine-tun"), "{stdout}");
    let out = kiln().args(["sample", "--help"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("--window") && stdout.contains("slide"),
        "{stdout}"
    );
}
