//! The `kiln` command: a thin layer over the library.

mod cli;

use clap::Parser;

fn main() {
    quiet_device_select_layer();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let args = cli::Args::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

/// Mesa installs an implicit Vulkan layer, `VK_LAYER_MESA_device_select`, that on every instance
/// creation tries to reach a Wayland and an X display to learn the desktop's default GPU. On a
/// headless machine libwayland then prints "XDG_RUNTIME_DIR is invalid or not set" to stderr for
/// each instance. kiln chooses its adapter itself (`--adapter`), so the layer has nothing to do
/// for it: turn it off through its documented switch, unless the user configured it.
fn quiet_device_select_layer() {
    let configured = ["NODEVICE_SELECT", "MESA_VK_DEVICE_SELECT"]
        .iter()
        .any(|k| std::env::var_os(k).is_some());
    if !configured {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}
