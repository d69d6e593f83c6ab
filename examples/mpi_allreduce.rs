//! Times kiln's gradient all-reduce alone between MPI ranks (cargo feature `mpi`):
//! `mpirun -np 2 target/release/examples/mpi_allreduce [ELEMENTS] [REPEATS]`. Prints, on rank 0,
//! milliseconds per all-reduce of ELEMENTS f32 (default 804,097: the baby GPT's gradient and
//! its loss) and the bytes each rank sent per second.

use kiln::dist::{self, Communicator};
use std::time::Instant;

fn main() -> kiln::Result<()> {
    let mut args = std::env::args().skip(1);
    let len: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(804_097);
    let repeats: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let mut comm = dist::mpi::MpiComm::init(dist::timeout_from_env()?)?;
    let (rank, size) = (comm.rank(), comm.size());
    let mut data: Vec<f32> = (0..len)
        .map(|i| (i % 97) as f32 * 0.01 + rank as f32)
        .collect();
    // Warm-up, and every rank in step before timing.
    dist::all_reduce_mean(&mut comm, "warm-up", &mut data)?;
    let mut times = Vec::with_capacity(repeats);
    for i in 0..repeats {
        dist::all_gather(&mut comm, "barrier", &[0])?;
        let start = Instant::now();
        dist::all_reduce_mean(&mut comm, &format!("all-reduce {i}"), &mut data)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let sent = 2.0 * (size - 1) as f64 / size as f64 * 4.0 * len as f64;
    if rank == 0 {
        println!(
            "{size} ranks, {len} f32 ({:.1} MB): median {:.2} ms per all-reduce (min {:.2}, max \
             {:.2}), {:.2} MB sent per rank, {:.2} GB/s",
            4.0 * len as f64 / 1e6,
            1e3 * median,
            1e3 * times[0],
            1e3 * times[times.len() - 1],
            sent / 1e6,
            sent / median / 1e9
        );
    }
    dist::all_gather(&mut comm, "end", &[0])?;
    comm.completed();
    Ok(())
}
