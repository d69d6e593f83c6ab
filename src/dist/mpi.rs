//! [`MpiComm`]: the [`Communicator`] over MPI (cargo feature `mpi`), for ranks launched by
//! `mpirun` / `srun`.
//!
//! Exchanges use non-blocking point-to-point messages (`MPI_Isend` / `MPI_Irecv` of bytes),
//! polled with `MPI_Test` against the deadline, rather than MPI's blocking collectives: a
//! blocking `MPI_Allreduce` waits forever for a rank that was stopped, and a collective cannot
//! say which rank is missing, while a pending receive names its sender. Buffers handed to MPI
//! are owned here and deliberately leaked when a deadline passes, since MPI may still write
//! into them; the process is expected to exit then.

use super::{Communicator, MAX_MESSAGE_BYTES};
use crate::{Error, Result};
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::Communicator as _;
use std::os::raw::{c_int, c_void};
use std::time::{Duration, Instant};

/// MPI's world communicator. Holds the MPI environment: dropping the last `MpiComm` finalizes MPI.
pub struct MpiComm {
    universe: Option<mpi::environment::Universe>,
    comm: ffi::MPI_Comm,
    rank: usize,
    size: usize,
    local_rank: usize,
    timeout: Duration,
    /// Set by [`Communicator::completed`]: every rank got through the last exchange, so
    /// dropping may finalize MPI. Otherwise (an error on some rank) finalizing could wait for a
    /// rank that is gone, and the environment is leaked instead.
    finalize: bool,
    /// Set once an exchange timed out: the pending requests were abandoned.
    broken: bool,
}

// SAFETY: MPI is initialized with MPI_THREAD_SERIALIZED (checked in `init`): calls may come
// from any thread as long as they do not overlap, which `&mut self` on every call guarantees.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Initializes MPI and joins `MPI_COMM_WORLD`; `timeout` bounds every exchange.
    pub fn init(timeout: Duration) -> Result<MpiComm> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::Distributed {
                message: "MPI was already initialized in this process".into(),
            })?;
        if threading < mpi::Threading::Serialized {
            return Err(Error::Distributed {
                message: format!(
                    "this MPI library offers thread level {threading:?}; kiln needs Serialized \
                     (its device threads run beside the one that calls MPI)"
                ),
            });
        }
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        // Ranks on the same node: a shared-memory split of the world.
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        Ok(MpiComm {
            comm: world.as_raw(),
            universe: Some(universe),
            rank,
            size,
            local_rank,
            timeout,
            finalize: false,
            broken: false,
        })
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        // MPI_Finalize waits for the other ranks; after a lost rank or an error it could wait
        // forever, so the environment is leaked instead (the process is about to exit, and
        // the launcher reports a rank that ended without finalizing).
        if self.broken || !self.finalize {
            std::mem::forget(self.universe.take());
        }
    }
}

/// One posted transfer: its request and the peer.
struct Pending {
    request: ffi::MPI_Request,
    peer: usize,
    done: bool,
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn completed(&mut self) {
        self.finalize = !self.broken;
    }

    fn exchange(
        &mut self,
        what: &str,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>> {
        if self.broken {
            return Err(Error::Distributed {
                message: format!("{what}: an earlier exchange lost a rank; the job cannot go on"),
            });
        }
        let start = Instant::now();
        for &(peer, _) in &sends {
            if peer >= self.size || peer == self.rank {
                return Err(Error::Distributed {
                    message: format!("{what}: there is no other rank {peer} to send to"),
                });
            }
        }
        let mut received: Vec<Vec<u8>> = recvs.iter().map(|&(_, len)| vec![0u8; len]).collect();
        let mut pending: Vec<Pending> = Vec::new();
        // SAFETY: every buffer below (`sends`' vectors, `received`) stays alive and unmoved
        // until its request completes: on success all are tested complete before returning; on
        // a timeout both are leaked with `mem::forget`, so MPI never writes freed memory.
        unsafe {
            for (peer, bytes) in &sends {
                for (k, piece) in bytes.chunks(MAX_MESSAGE_BYTES).enumerate() {
                    let mut request = ffi::RSMPI_REQUEST_NULL;
                    ffi::MPI_Isend(
                        piece.as_ptr() as *const c_void,
                        piece.len() as c_int,
                        ffi::RSMPI_UINT8_T,
                        *peer as c_int,
                        k as c_int,
                        self.comm,
                        &mut request,
                    );
                    pending.push(Pending {
                        request,
                        peer: *peer,
                        done: false,
                    });
                }
            }
            for (buf, &(peer, _)) in received.iter_mut().zip(recvs) {
                if peer >= self.size || peer == self.rank {
                    return Err(Error::Distributed {
                        message: format!("{what}: there is no other rank {peer} to receive from"),
                    });
                }
                for (k, piece) in buf.chunks_mut(MAX_MESSAGE_BYTES).enumerate() {
                    let mut request = ffi::RSMPI_REQUEST_NULL;
                    ffi::MPI_Irecv(
                        piece.as_mut_ptr() as *mut c_void,
                        piece.len() as c_int,
                        ffi::RSMPI_UINT8_T,
                        peer as c_int,
                        k as c_int,
                        self.comm,
                        &mut request,
                    );
                    pending.push(Pending {
                        request,
                        peer,
                        done: false,
                    });
                }
            }
            // Poll: MPI progresses transfers inside MPI_Test (a large message over shared
            // memory moves one fragment per call), so the first SPIN of an exchange polls
            // without sleeping; after that a rank is waiting for a peer that has not arrived,
            // and a sleep between polls leaves the CPU to the device threads (ranks may share
            // cores and a software GPU).
            const SPIN: Duration = Duration::from_millis(20);
            let mut nap = Duration::from_micros(20);
            loop {
                let mut all_done = true;
                for p in pending.iter_mut().filter(|p| !p.done) {
                    let mut flag: c_int = 0;
                    ffi::MPI_Test(&mut p.request, &mut flag, ffi::RSMPI_STATUS_IGNORE);
                    p.done = flag != 0;
                    all_done &= p.done;
                }
                if all_done {
                    break;
                }
                if start.elapsed() > self.timeout {
                    let mut lost: Vec<usize> =
                        pending.iter().filter(|p| !p.done).map(|p| p.peer).collect();
                    lost.sort_unstable();
                    lost.dedup();
                    self.broken = true;
                    std::mem::forget(sends);
                    std::mem::forget(received);
                    return Err(Error::RankLost {
                        rank: lost.first().copied().unwrap_or(0),
                        what: what.to_string(),
                        seconds: start.elapsed().as_secs_f64(),
                    });
                }
                if start.elapsed() < SPIN {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(1));
                }
            }
        }
        drop(sends);
        Ok(received)
    }
}
