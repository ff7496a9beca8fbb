//! [`ThreadCommunicator`]: ranks as threads of one process.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::communicator::{CommConfig, HostValues};
use super::host_collectives::{self as hc, HostCollectives};
use crate::{Error, Result};

/// One rank's contribution to a collective.
#[derive(Debug, Clone)]
enum Payload {
    Values(HostValues),
    Bytes(Vec<u8>),
    Nothing,
}

/// Every rank's contribution to one collective: (the collective's name, payload).
type Contributions = Arc<Vec<(String, Payload)>>;

/// The state the ranks of a group share.
#[derive(Debug)]
struct State {
    /// The collective being assembled (every rank counts its own).
    round: u64,
    /// Contributions to `round`, by rank.
    slots: Vec<Option<(String, Payload)>>,
    /// The last completed collective: (round, every rank's contribution).
    done: Option<(u64, Contributions)>,
    /// Ranks whose communicator was dropped.
    left: Vec<bool>,
}

#[derive(Debug)]
struct Group {
    state: Mutex<State>,
    changed: Condvar,
    timeout: Duration,
}

/// A rank of a group of threads in one process: the collectives of
/// [`Communicator`](super::Communicator) through shared memory.
///
/// [`ThreadCommunicator::group`] makes the `world_size` communicators of a
/// group; give one to each thread (each thread one rank, e.g. one CUDA
/// device each, or CPU training where threads are cheaper than
/// processes). Results are the same on every rank and independent of
/// timing (sums run in rank order). A rank that drops its communicator
/// without taking part in a collective the others are in makes them fail
/// at once with [`Error::Communication`]; one that does not arrive within
/// [`CommConfig::timeout_secs`] makes them fail then.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::distributed::{CommConfig, Communicator, ThreadCommunicator};
///
/// let comms = ThreadCommunicator::group(2, CommConfig::default())?;
/// let sums = std::thread::scope(|s| {
///     let handles: Vec<_> = comms
///         .iter()
///         .map(|c| s.spawn(move || -> aimass::Result<Vec<f32>> {
///             let t = Tensor::new(&[c.rank() as f32 + 1.0, 10.0], &Device::Cpu)?;
///             Ok(c.all_reduce_sum(&t)?.to_vec1::<f32>()?)
///         }))
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect::<aimass::Result<Vec<_>>>()
/// })?;
/// assert_eq!(sums, vec![vec![3.0, 20.0], vec![3.0, 20.0]]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug)]
pub struct ThreadCommunicator {
    group: Arc<Group>,
    rank: usize,
    world_size: usize,
    /// This rank's count of collectives (the next round it joins).
    round: Mutex<u64>,
}

impl ThreadCommunicator {
    /// The `world_size` communicators of a new group, rank 0 first.
    pub fn group(world_size: usize, config: CommConfig) -> Result<Vec<ThreadCommunicator>> {
        config.validate()?;
        if world_size == 0 {
            return Err(Error::config(
                "ThreadCommunicator::group world_size",
                0,
                "must be at least 1",
            ));
        }
        let group = Arc::new(Group {
            state: Mutex::new(State {
                round: 0,
                slots: vec![None; world_size],
                done: None,
                left: vec![false; world_size],
            }),
            changed: Condvar::new(),
            timeout: config.timeout(),
        });
        Ok((0..world_size)
            .map(|rank| ThreadCommunicator {
                group: Arc::clone(&group),
                rank,
                world_size,
                round: Mutex::new(0),
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock left consistent
        // state (every update is a single assignment): go on.
        self.group
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Contributes `payload` to this rank's next collective `op` and
    /// returns every rank's contribution once all have arrived.
    fn exchange(&self, op: &str, payload: Payload) -> Result<Contributions> {
        let mut round = self.round.lock().unwrap_or_else(|p| p.into_inner());
        let mine = *round;
        let deadline = Instant::now() + self.group.timeout;
        let mut st = self.lock();
        // The previous collective completed before this rank's call to it
        // returned, so the group is at this rank's round.
        if st.round != mine {
            return Err(Error::communication(
                op,
                self.rank,
                format!(
                    "the group is at collective {} and this rank at {mine}: a collective failed earlier on this rank",
                    st.round
                ),
            ));
        }
        st.slots[self.rank] = Some((op.to_string(), payload));
        if st.slots.iter().all(Option::is_some) {
            let all: Vec<(String, Payload)> =
                st.slots.iter_mut().filter_map(Option::take).collect();
            st.done = Some((mine, Arc::new(all)));
            st.round += 1;
            self.group.changed.notify_all();
        }
        loop {
            if let Some((r, all)) = &st.done {
                if *r == mine {
                    let all = Arc::clone(all);
                    *round += 1;
                    return check_ops(op, self.rank, all);
                }
            }
            if let Some(gone) = (0..self.world_size).find(|&r| st.left[r] && st.slots[r].is_none())
            {
                st.slots[self.rank] = None;
                return Err(Error::communication(
                    op,
                    self.rank,
                    format!("rank {gone} left the group (its thread returned, failed or panicked) without joining this collective"),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                st.slots[self.rank] = None;
                let missing: Vec<usize> = (0..self.world_size)
                    .filter(|&r| st.slots[r].is_none() && r != self.rank)
                    .collect();
                return Err(Error::communication(
                    op,
                    self.rank,
                    format!(
                        "timed out after {:.1} s waiting for rank(s) {missing:?}: a rank failed, hangs, or makes different collective calls (raise CommConfig::timeout_secs if a rank legitimately works alone that long)",
                        self.group.timeout.as_secs_f64()
                    ),
                ));
            }
            st = self
                .group
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Checks that every rank called the same collective.
fn check_ops(op: &str, rank: usize, all: Contributions) -> Result<Contributions> {
    if let Some((r, (other, _))) = all.iter().enumerate().find(|(_, (o, _))| o != op) {
        return Err(Error::communication(
            op,
            rank,
            format!(
                "rank {r} called {other} at the same point: the ranks' collective calls differ"
            ),
        ));
    }
    Ok(all)
}

impl Drop for ThreadCommunicator {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.left[self.rank] = true;
        self.group.changed.notify_all();
    }
}

impl HostCollectives for ThreadCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn sum_values(&self, op: &str, values: &mut HostValues) -> Result<()> {
        let all = self.exchange(op, Payload::Values(values.clone()))?;
        let mismatch = |r: usize| {
            Error::communication(
                op,
                self.rank,
                format!("rank {r} passed a tensor of another size or dtype: every rank must reduce the same shape"),
            )
        };
        // Every rank sums in rank order: the same result everywhere.
        match values {
            HostValues::F32(acc) => {
                acc.iter_mut().for_each(|x| *x = 0.0);
                for (r, (_, p)) in all.iter().enumerate() {
                    match p {
                        Payload::Values(HostValues::F32(v)) if v.len() == acc.len() => {
                            acc.iter_mut().zip(v).for_each(|(a, b)| *a += b)
                        }
                        _ => return Err(mismatch(r)),
                    }
                }
            }
            HostValues::F64(acc) => {
                acc.iter_mut().for_each(|x| *x = 0.0);
                for (r, (_, p)) in all.iter().enumerate() {
                    match p {
                        Payload::Values(HostValues::F64(v)) if v.len() == acc.len() => {
                            acc.iter_mut().zip(v).for_each(|(a, b)| *a += b)
                        }
                        _ => return Err(mismatch(r)),
                    }
                }
            }
        }
        Ok(())
    }

    fn broadcast_bytes(&self, op: &str, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let payload = if self.rank == root {
            Payload::Bytes(std::mem::take(bytes))
        } else {
            Payload::Nothing
        };
        let all = self.exchange(op, payload)?;
        match &all[root].1 {
            Payload::Bytes(b) => {
                *bytes = b.clone();
                Ok(())
            }
            _ => Err(Error::communication(
                op,
                self.rank,
                format!("rank {root} did not send: the ranks disagree on the root"),
            )),
        }
    }

    fn gather_bytes(&self, op: &str, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let all = self.exchange(op, Payload::Bytes(bytes.to_vec()))?;
        all.iter()
            .enumerate()
            .map(|(r, (_, p))| match p {
                Payload::Bytes(b) => Ok(b.clone()),
                _ => Err(Error::communication(
                    op,
                    self.rank,
                    format!("rank {r} sent nothing to gather"),
                )),
            })
            .collect()
    }

    fn wait_all(&self) -> Result<()> {
        self.exchange("barrier", Payload::Nothing).map(|_| ())
    }
}

hc::impl_host_communicator!(ThreadCommunicator, "threads");
