//! The encoder's thread pool, shared by every run of one engine.

use std::sync::{Arc, Mutex, PoisonError};

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
