//! `kiln info`.

use super::Args;
use kiln::Result;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {}

pub fn run(args: &Args, _: &InfoArgs) -> Result<()> {
    let (adapters, searched) = kiln::gpu::adapter_search();
    println!("backends searched:");
    for line in &searched {
        println!("  {line}");
    }
    println!("adapters found: {}", adapters.len());
    for a in &adapters {
        println!("  {}", a.line());
    }
    let gpu = args.open_gpu()?;
    let caps = gpu.capabilities();
    let kind = if caps.adapter.software {
        " (software adapter)"
    } else {
        ""
    };
    println!(
        "selected: [{}] {}{kind}: {}",
        caps.adapter.index, caps.adapter.name, caps.choice_reason
    );
    if let Some(w) = &caps.slow_fallback {
        println!("warning: {w}");
    }
    println!("features granted:");
    for (name, on) in [
        ("SHADER_F16", caps.shader_f16),
        ("SUBGROUP", caps.subgroup),
        ("TIMESTAMP_QUERY", caps.timestamp_query),
        (
            "TIMESTAMP_QUERY_INSIDE_PASSES",
            caps.timestamp_inside_passes,
        ),
    ] {
        println!("  {name}: {}", if on { "granted" } else { "not available" });
    }
    println!("storage precision: {}", caps.precision);
    println!(
        "subgroup size: {}..={}",
        caps.subgroup_size.0, caps.subgroup_size.1
    );
    println!("timestamp period: {} ns", caps.timestamp_period_ns);
    let l = &caps.limits;
    println!("limits:");
    println!("  max_buffer_size: {}", l.max_buffer_size);
    println!(
        "  max_storage_buffer_binding_size: {}",
        l.max_storage_buffer_binding_size
    );
    println!(
        "  max_storage_buffers_per_shader_stage: {}",
        l.max_storage_buffers_per_shader_stage
    );
    println!(
        "  max_compute_workgroup_storage_size: {}",
        l.max_compute_workgroup_storage_size
    );
    println!(
        "  max_compute_invocations_per_workgroup: {}",
        l.max_compute_invocations_per_workgroup
    );
    println!(
        "  max_compute_workgroup_size: {}x{}x{}",
        l.max_compute_workgroup_size_x,
        l.max_compute_workgroup_size_y,
        l.max_compute_workgroup_size_z
    );
    println!(
        "  max_compute_workgroups_per_dimension: {}",
        l.max_compute_workgroups_per_dimension
    );
    println!(
        "  min_storage_buffer_offset_alignment: {}",
        l.min_storage_buffer_offset_alignment
    );
    Ok(())
}
