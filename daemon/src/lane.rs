//! A lane: a fixed set of threads that run blocking work in the order it arrives.
//!
//! Signing with a key in this process is pure CPU. On tokio's blocking pool each such job
//! wakes a thread of its own, and under load dozens of them take turns on a few cores: a
//! futex wake-up and a context switch per job, and a mutex all of them contend for. A lane
//! has as many threads as the work can use at once; a busy thread takes the next job from
//! the queue without sleeping.

use std::panic::AssertUnwindSafe;

type Job = Box<dyn FnOnce() + Send>;

/// The threads of a lane, and the queue in front of them. Dropping the lane lets its threads
/// finish the jobs already queued and end.
pub struct Lane {
    jobs: crossbeam_channel::Sender<Job>,
}

/// A job that did not return: it panicked, or the lane was gone.
#[derive(Debug)]
pub struct LaneFailed;

impl std::fmt::Display for LaneFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the job stopped without an answer")
    }
}

impl Lane {
    /// A lane of `threads` threads (at least one), named `name`.
    pub fn new(name: &str, threads: usize) -> std::io::Result<Lane> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    for job in queue {
                        // A panicking job answers nobody (its caller sees `LaneFailed`);
                        // the thread goes on with the next.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(Lane { jobs })
    }

    /// Runs `f` on one of the lane's threads and waits for its answer without blocking the
    /// caller's thread.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, LaneFailed> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = answer.send(f());
            }))
            .map_err(|_| LaneFailed)?;
        answered.await.map_err(|_| LaneFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_lanes_threads_and_answer() {
        let lane = Lane::new("test-lane", 2).unwrap();
        let name = lane
            .run(|| {
                std::thread::current()
                    .name()
                    .unwrap_or_default()
                    .to_string()
            })
            .await
            .unwrap();
        assert!(name.starts_with("test-lane-"), "{name}");
        let sums =
            futures_util::future::join_all((0..64u64).map(|i| lane.run(move || i * 2))).await;
        let sums: Vec<u64> = sums.into_iter().map(Result::unwrap).collect();
        assert_eq!(sums, (0..64u64).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_the_lane_goes_on() {
        let lane = Lane::new("test-lane", 1).unwrap();
        assert!(lane.run(|| panic!("a job that panics")).await.is_err());
        assert_eq!(lane.run(|| 7).await.unwrap(), 7);
    }
}
