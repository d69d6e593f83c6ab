//! Ranks as threads of one process, joined by channels: the multi-rank protocol without MPI
//! (tests of the trainer's distributed path, simulations of N ranks on one device).

use super::Communicator;
use crate::{Error, Result};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

/// Builds the [`ThreadComm`]s of a group of ranks that run as threads.
pub struct ThreadGroup;

impl ThreadGroup {
    /// `size` connected communicators, rank i at index i, each waiting at most `timeout` in an
    /// exchange. Move each into its own thread.
    pub fn connect(size: usize, timeout: Duration) -> Vec<ThreadComm> {
        let size = size.max(1);
        // One channel per ordered pair (from, to): messages between two ranks stay in order.
        let mut senders: Vec<Vec<Option<Sender<Vec<u8>>>>> = (0..size)
            .map(|_| (0..size).map(|_| None).collect())
            .collect();
        let mut receivers: Vec<Vec<Option<Receiver<Vec<u8>>>>> = (0..size)
            .map(|_| (0..size).map(|_| None).collect())
            .collect();
        for from in 0..size {
            for to in 0..size {
                if from != to {
                    let (tx, rx) = channel();
                    senders[from][to] = Some(tx);
                    receivers[to][from] = Some(rx);
                }
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| ThreadComm {
                rank,
                size,
                timeout,
                to,
                from,
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`]. Dropping it is how a simulated rank "dies": the others see
/// [`Error::RankLost`].
pub struct ThreadComm {
    rank: usize,
    size: usize,
    timeout: Duration,
    to: Vec<Option<Sender<Vec<u8>>>>,
    from: Vec<Option<Receiver<Vec<u8>>>>,
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn exchange(
        &mut self,
        what: &str,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>> {
        let start = Instant::now();
        let lost = |rank: usize| Error::RankLost {
            rank,
            what: what.to_string(),
            seconds: start.elapsed().as_secs_f64(),
        };
        for (to, bytes) in sends {
            let tx = self
                .to
                .get(to)
                .and_then(Option::as_ref)
                .ok_or_else(|| bad_rank(what, to))?;
            // A send fails only when the receiving rank is gone.
            tx.send(bytes).map_err(|_| lost(to))?;
        }
        let mut out = Vec::with_capacity(recvs.len());
        for &(from, len) in recvs {
            let rx = self
                .from
                .get(from)
                .and_then(Option::as_ref)
                .ok_or_else(|| bad_rank(what, from))?;
            let left = self.timeout.saturating_sub(start.elapsed());
            let bytes = match rx.recv_timeout(left) {
                Ok(b) => b,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(lost(from));
                }
            };
            if bytes.len() != len {
                return Err(Error::Distributed {
                    message: format!(
                        "{what}: rank {from} sent {} bytes where {len} were expected (the ranks \
                         are not running the same step)",
                        bytes.len()
                    ),
                });
            }
            out.push(bytes);
        }
        Ok(out)
    }
}

fn bad_rank(what: &str, rank: usize) -> Error {
    Error::Distributed {
        message: format!("{what}: there is no rank {rank} to exchange with"),
    }
}
