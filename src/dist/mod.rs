//! Data-parallel training: several processes ("ranks"), each with its own device and a copy of
//! the model, each training on its share of every global batch, with the gradients averaged
//! across ranks once per step before the gradient norm and AdamW.
//!
//! - [`Communicator`]: what the trainer needs from the transport: rank, size, local rank and one
//!   primitive, [`Communicator::exchange`] (post every send and receive at once, wait for all of
//!   them until a deadline). [`Single`] is the one-process no-op; [`ThreadGroup`] runs ranks as
//!   threads of one process (tests, simulations); `MpiComm` (cargo feature `mpi`) is MPI's
//!   point-to-point messages.
//! - [`all_reduce_mean`]: the gradient average, as a reduce-scatter then an all-gather over
//!   [`owner_range`] slices. Rank r sums slice r of every rank's buffer **in rank order** (0, 1,
//!   …, N−1) whatever order the messages arrived in, then sends the result to every rank: the
//!   average does not depend on timing, and every rank ends with the same bits. Each rank sends
//!   and receives 2·(N−1)/N of the buffer, what a ring all-reduce moves.
//! - [`agree`]: the start-up check that every rank has the same config, data and weights.
//! - [`rank_rows`]: which rows of the global batch a rank trains on.
//!
//! Every wait is bounded by [`Communicator::timeout`]: a rank that died or stopped makes the
//! others fail with [`Error::RankLost`] naming it instead of hanging.

#[cfg(feature = "mpi")]
pub mod mpi;
mod threads;

pub use threads::{ThreadComm, ThreadGroup};

use crate::{Error, Result};
use std::time::Duration;

/// Default deadline for one exchange: long enough for a rank 0 that is writing a small
/// checkpoint or a slow software adapter, short enough that a lost rank is noticed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment variable that overrides [`DEFAULT_TIMEOUT`] (seconds, may be fractional).
pub const TIMEOUT_ENV: &str = "KILN_DIST_TIMEOUT";

/// Largest single message (bytes) a transport sends: a bigger buffer goes as several messages.
/// Large, so that per-message latency is paid rarely, and below MPI's `int` count limit.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The deadline from [`TIMEOUT_ENV`], else [`DEFAULT_TIMEOUT`]; an unreadable value is an error.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var(TIMEOUT_ENV) {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(s) => match s.trim().parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 => Ok(Duration::from_secs_f64(secs)),
            _ => Err(Error::invalid(
                TIMEOUT_ENV,
                s,
                "must be a number of seconds > 0 (the longest wait for another rank)",
            )),
        },
    }
}

/// A group of ranks that can exchange bytes. Ranks run the same program and call the same
/// exchanges in the same order.
pub trait Communicator: Send {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Rank among the ranks on this machine (which GPU to use).
    fn local_rank(&self) -> usize;
    /// How long one exchange may wait for another rank.
    fn timeout(&self) -> Duration;
    /// Sends each `(to, bytes)` and receives one message of each `(from, len)`, all posted at
    /// once; returns the received messages in the order of `recvs` once every transfer is
    /// done. `what` names the exchange in errors. A peer that has not answered within
    /// [`Communicator::timeout`] is [`Error::RankLost`]; after that error the communicator
    /// must not be used again (the process should exit).
    fn exchange(
        &mut self,
        what: &str,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>>;
    /// Marks the run as finished on every rank (after a last successful exchange): a transport
    /// may then shut down cleanly when dropped, where after an error it must not wait for the
    /// others (MPI: finalize, or exit without it).
    fn completed(&mut self) {}
}

/// The number of ranks an MPI launcher (`mpirun`, `mpiexec`, `srun` with PMI/PMIx) says this
/// job has, from its environment; `None` when this process was not started by one.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// One process alone: rank 0 of 1, nothing to exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn timeout(&self) -> Duration {
        DEFAULT_TIMEOUT
    }
    fn exchange(
        &mut self,
        what: &str,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>> {
        if sends.is_empty() && recvs.is_empty() {
            return Ok(Vec::new());
        }
        Err(Error::Distributed {
            message: format!("{what}: a single process has no other rank to exchange with"),
        })
    }
}

/// The slice of a `len`-element buffer that rank `rank` of `size` owns in [`all_reduce_mean`]:
/// contiguous, in rank order, sizes differing by at most one element.
pub fn owner_range(len: usize, size: usize, rank: usize) -> std::ops::Range<usize> {
    let size = size.max(1);
    let (base, extra) = (len / size, len % size);
    let start = rank * base + rank.min(extra);
    let end = start + base + usize::from(rank < extra);
    start..end
}

/// The rows of a global batch of `batch_size` rows that rank `rank` of `size` trains on:
/// `rank·B/N .. (rank+1)·B/N`, so that N ranks together see exactly the rows one process would.
/// An error when `batch_size` is not a multiple of `size`.
pub fn rank_rows(batch_size: usize, size: usize, rank: usize) -> Result<std::ops::Range<usize>> {
    if size == 0 || !batch_size.is_multiple_of(size) || batch_size < size {
        return Err(Error::invalid(
            "train.batch_size",
            batch_size,
            format!(
                "the global batch must be a positive multiple of the number of ranks ({size}) \
                 so that every rank trains on the same number of rows; choose a batch size \
                 divisible by {size} (e.g. {}) or run with a number of ranks that divides it",
                size * batch_size.div_ceil(size).max(1)
            ),
        ));
    }
    let per = batch_size / size;
    Ok(rank * per..(rank + 1) * per)
}

/// Sums `parts` element-wise in the order given (rank order), starting from the first: the
/// one summation order every rank agrees on. All parts must have the same length.
pub fn sum_in_rank_order(parts: &[&[f32]]) -> Vec<f32> {
    let Some((first, rest)) = parts.split_first() else {
        return Vec::new();
    };
    let mut acc = first.to_vec();
    for part in rest {
        for (a, &b) in acc.iter_mut().zip(part.iter()) {
            *a += b;
        }
    }
    acc
}

/// The average of every rank's `data`, in place, identical on every rank (see the module
/// notes): reduce-scatter in [`owner_range`] slices summed in rank order, divided by the
/// number of ranks, then all-gathered. Nothing happens with one rank.
pub fn all_reduce_mean(comm: &mut dyn Communicator, what: &str, data: &mut [f32]) -> Result<()> {
    let (n, me) = (comm.size(), comm.rank());
    if n <= 1 {
        return Ok(());
    }
    let len = data.len();
    let mine = owner_range(len, n, me);
    // Reduce-scatter: every other rank's copy of my slice comes to me; I send them theirs.
    let sends = (0..n)
        .filter(|&p| p != me)
        .map(|p| {
            (
                p,
                bytemuck::cast_slice(&data[owner_range(len, n, p)]).to_vec(),
            )
        })
        .collect();
    let recvs: Vec<(usize, usize)> = (0..n)
        .filter(|&p| p != me)
        .map(|p| (p, 4 * mine.len()))
        .collect();
    let got = comm.exchange(what, sends, &recvs)?;
    let mut received = got.into_iter();
    let parts: Vec<Vec<f32>> = (0..n)
        .map(|p| {
            if p == me {
                data[mine.clone()].to_vec()
            } else {
                // The exchange returns exactly the requested lengths.
                received
                    .next()
                    .map(|b| bytemuck::pod_collect_to_vec(&b))
                    .unwrap_or_default()
            }
        })
        .collect();
    if parts.iter().any(|p| p.len() != mine.len()) {
        return Err(Error::Distributed {
            message: format!("{what}: a rank sent a slice of the wrong length"),
        });
    }
    let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
    let mut reduced = sum_in_rank_order(&refs);
    let ranks = n as f32;
    for x in &mut reduced {
        *x /= ranks;
    }
    data[mine.clone()].copy_from_slice(&reduced);
    // All-gather: my reduced slice to everyone, theirs to me.
    let bytes: Vec<u8> = bytemuck::cast_slice(&reduced).to_vec();
    let sends = (0..n)
        .filter(|&p| p != me)
        .map(|p| (p, bytes.clone()))
        .collect();
    let recvs: Vec<(usize, usize)> = (0..n)
        .filter(|&p| p != me)
        .map(|p| (p, 4 * owner_range(len, n, p).len()))
        .collect();
    let got = comm.exchange(what, sends, &recvs)?;
    for ((p, _), bytes) in recvs.iter().zip(got) {
        let range = owner_range(len, n, *p);
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        if values.len() != range.len() {
            return Err(Error::Distributed {
                message: format!("{what}: rank {p} sent a reduced slice of the wrong length"),
            });
        }
        data[range].copy_from_slice(&values);
    }
    Ok(())
}

/// Every rank's `mine` (all the same length), in rank order.
pub fn all_gather(comm: &mut dyn Communicator, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    let (n, me) = (comm.size(), comm.rank());
    let sends = (0..n)
        .filter(|&p| p != me)
        .map(|p| (p, mine.to_vec()))
        .collect();
    let recvs: Vec<(usize, usize)> = (0..n)
        .filter(|&p| p != me)
        .map(|p| (p, mine.len()))
        .collect();
    let mut got = comm.exchange(what, sends, &recvs)?.into_iter();
    Ok((0..n)
        .map(|p| {
            if p == me {
                mine.to_vec()
            } else {
                got.next().unwrap_or_default()
            }
        })
        .collect())
}

/// What every rank must have the same of before training starts, each as a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    /// `(name, digest)` pairs, e.g. `("config", sha256)`; names say what differs in errors.
    pub items: Vec<(&'static str, [u8; 32])>,
}

impl Fingerprint {
    fn bytes(&self) -> Vec<u8> {
        self.items.iter().flat_map(|(_, d)| d.to_vec()).collect()
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Checks that every rank has the same fingerprint as rank 0; the error names the first rank
/// and the items that differ (config, data, weights/checkpoint).
pub fn agree(comm: &mut dyn Communicator, mine: &Fingerprint) -> Result<()> {
    if comm.size() <= 1 {
        return Ok(());
    }
    let all = all_gather(comm, "the start-up agreement check", &mine.bytes())?;
    let reference = &all[0];
    for (rank, theirs) in all.iter().enumerate().skip(1) {
        if theirs == reference {
            continue;
        }
        let differing: Vec<String> = mine
            .items
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                theirs.get(32 * i..32 * (i + 1)) != reference.get(32 * i..32 * (i + 1))
            })
            .map(|(i, (name, _))| {
                let short = |b: &[u8]| {
                    b.iter()
                        .take(6)
                        .map(|x| format!("{x:02x}"))
                        .collect::<String>()
                };
                format!(
                    "{name} (rank 0: {}…, rank {rank}: {}…)",
                    short(&reference[32 * i..32 * (i + 1)]),
                    short(theirs.get(32 * i..32 * (i + 1)).unwrap_or_default())
                )
            })
            .collect();
        return Err(Error::Distributed {
            message: format!(
                "rank {rank} disagrees with rank 0 on {}: every rank must start from the same \
                 config (file and --set overrides), the same corpus and the same checkpoint; \
                 check the paths each rank sees (a shared file system, or identical copies)",
                differing.join(", ")
            ),
        });
    }
    Ok(())
}
