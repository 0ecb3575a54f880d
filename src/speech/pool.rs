//! The encoder's thread pool, shared by every run of one engine.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use tract_linalg::multithread::{Executor, multithread_tract_scope};

/// The pool tract's matmuls split across (none at one thread), and the turn
/// every job on it takes.
///
/// One job at a time: tract 0.23.9's `OptMatMul::eval` keeps a thread-local
/// `RefCell` (its scratch space) mutably borrowed while its tiles run on the
/// pool. A pool thread waiting there for tiles steals whatever job is queued,
/// and if that is another caller's plan run, the first matmul of it borrows
/// the same `RefCell` again and panics ("RefCell already borrowed"): two
/// recognizers sharing a two-thread pool failed that way in 9 of 15 runs of
/// `a_shared_two_thread_pool_decodes_to_the_same_ids`. Queued one at a time,
/// a waiting pool thread only ever steals tiles and row chunks of the job it
/// is in. Two jobs on one two-thread pool gain nothing from overlapping anyway.
#[derive(Clone)]
pub(crate) struct Pool {
    executor: Option<Executor>,
    turn: Arc<Mutex<()>>,
}

impl Pool {
    /// A pool of `threads` threads; at one thread (or zero) there is none.
    pub(crate) fn new(threads: usize) -> Pool {
        Pool {
            executor: (threads > 1).then(|| Executor::multithread(threads)),
            turn: Arc::default(),
        }
    }

    /// The executor plans are built with (`None`: tract's default, here).
    pub(crate) fn executor(&self) -> Option<Executor> {
        self.executor.clone()
    }

    /// Whether there are threads to split work across.
    pub(crate) fn is_parallel(&self) -> bool {
        self.executor.is_some()
    }

    /// Threads in the pool (1 where there is none).
    pub(crate) fn threads(&self) -> usize {
        match &self.executor {
            Some(Executor::MultiThread(pool)) => pool.current_num_threads(),
            _ => 1,
        }
    }

    /// Runs jobs `0..jobs` side by side, holding the turn: each of `workers`
    /// on a pool thread of its own, taking the next job as it finishes one,
    /// with every matmul and loop inside on that thread alone. `done(job,
    /// result)` runs here, on the calling thread, as each job finishes; once
    /// it returns `false` no further job starts. Without a pool, or with one
    /// worker, the jobs run here in turn on the first worker.
    ///
    /// Jobs side by side use the cores better than one job split over them:
    /// two one-thread encoder runs at once each keep their one-thread speed,
    /// where one run split over two threads of a shared machine was 1.3-2x
    /// faster by the minute (docs/perf.md, "The thirteenth round").
    pub(crate) fn side_by_side<W: Send, T: Send>(
        &self,
        mut workers: Vec<W>,
        jobs: usize,
        work: impl Fn(&mut W, usize) -> T + Sync,
        mut done: impl FnMut(usize, T) -> bool,
    ) {
        let pool = match &self.executor {
            Some(Executor::MultiThread(pool)) if workers.len() > 1 && jobs > 1 => pool,
            _ => {
                if let Some(worker) = workers.first_mut() {
                    for job in 0..jobs {
                        if !done(job, work(worker, job)) {
                            break;
                        }
                    }
                }
                return;
            }
        };
        self.in_turn(|| {
            let next = AtomicUsize::new(0);
            let stop = AtomicBool::new(false);
            let (tx, rx) = mpsc::channel();
            pool.in_place_scope(|scope| {
                for mut worker in workers {
                    let (tx, next, stop, work) = (tx.clone(), &next, &stop, &work);
                    scope.spawn(move |_| {
                        multithread_tract_scope(Executor::SingleThread, || {
                            while !stop.load(Ordering::SeqCst) {
                                let job = next.fetch_add(1, Ordering::SeqCst);
                                if job >= jobs || tx.send((job, work(&mut worker, job))).is_err() {
                                    break;
                                }
                            }
                        })
                    });
                }
                // The workers hold the only senders left: the loop ends when
                // the last of them is through (or has panicked, which the
                // scope then raises here).
                drop(tx);
                for (job, result) in rx {
                    if !done(job, result) {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            });
        })
    }

    /// Runs `f` on one of the pool's threads, holding the turn; at one thread,
    /// here.
    ///
    /// A plan run from outside the pool is a third thread beside the pool's two
    /// on a two-core machine: the element-wise ops between matmuls run on it
    /// while the pool's idle threads spin for work, and the matmuls' share of the
    /// cores shrinks. Started inside, the calling thread is one of the pool's, the
    /// matmuls split over both, and the element-wise ops have a core to
    /// themselves: int8 10 s 0.53 -> 0.39 s, fp32 0.54 -> 0.46 s at two threads
    /// (docs/perf.md).
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.executor {
            Some(Executor::MultiThread(pool)) => self.in_turn(|| pool.install(f)),
            _ => f(),
        }
    }

    /// Runs `f` here, holding the turn, with tract's parallel helpers
    /// (`par_chunks_mut` and the like) splitting across the pool.
    pub(crate) fn scoped<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.executor {
            Some(executor) => self.in_turn(|| multithread_tract_scope(executor.clone(), f)),
            None => f(),
        }
    }

    /// Runs `f` holding the turn (a panic in another job leaves nothing to
    /// repair, so a poisoned turn is taken as it is).
    fn in_turn<R>(&self, f: impl FnOnce() -> R) -> R {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each job once, results to `done` on the calling thread, each worker on
    /// a pool thread of its own with tract's executor set to one thread.
    #[test]
    fn side_by_side_runs_every_job_once_on_the_pool_serially() {
        let pool = Pool::new(2);
        let caller = std::thread::current().id();
        let mut seen = vec![0; 9];
        let threads = Mutex::new(std::collections::HashSet::new());
        pool.side_by_side(
            vec![0usize, 0],
            seen.len(),
            |count, job| {
                *count += 1;
                threads.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(std::time::Duration::from_millis(5));
                let serial = matches!(
                    tract_linalg::multithread::current_tract_executor(),
                    Executor::SingleThread
                );
                (job, serial)
            },
            |job, (ran, serial)| {
                assert_eq!(job, ran);
                assert!(serial, "job {job} ran with the pool as its executor");
                assert_eq!(std::thread::current().id(), caller);
                seen[job] += 1;
                true
            },
        );
        assert_eq!(seen, vec![1; 9]);
        let threads = threads.into_inner().unwrap();
        assert!(!threads.contains(&caller));
        assert_eq!(threads.len(), 2, "both workers ran jobs");
    }

    #[test]
    fn side_by_side_starts_no_job_after_done_says_stop() {
        let pool = Pool::new(2);
        let started = AtomicUsize::new(0);
        let mut finished = 0;
        pool.side_by_side(
            vec![(), ()],
            100,
            |_, _| {
                started.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(50));
            },
            |_, ()| {
                finished += 1;
                finished < 3
            },
        );
        // Each worker may have started one more before it saw the stop, and
        // one more again if this thread was slow to read a result.
        let started = started.into_inner();
        assert!((3..=7).contains(&started), "{started} jobs started");
        assert_eq!(finished, started);
    }

    #[test]
    fn without_a_pool_jobs_run_here_in_turn() {
        let pool = Pool::new(1);
        let caller = std::thread::current().id();
        let mut order = Vec::new();
        pool.side_by_side(
            vec![(), ()],
            4,
            |_, job| {
                assert_eq!(std::thread::current().id(), caller);
                job
            },
            |job, ran| {
                order.push((job, ran));
                true
            },
        );
        assert_eq!(order, vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
    }

    #[test]
    fn a_panicking_job_reaches_the_caller() {
        let pool = Pool::new(2);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.side_by_side(
                vec![(), ()],
                6,
                |_, job| assert_ne!(job, 3, "job 3 fails"),
                |_, ()| true,
            )
        }));
        assert!(outcome.is_err());
        // The pool and its turn still work.
        let mut count = 0;
        pool.side_by_side(
            vec![(), ()],
            4,
            |_, _| (),
            |_, ()| {
                count += 1;
                true
            },
        );
        assert_eq!(count, 4);
    }
}
