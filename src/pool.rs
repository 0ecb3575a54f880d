//! A fixed set of worker threads, each owning a [`Recognizer`] over the one
//! shared [`Engine`] (weights in memory once, whatever the pool size).
//!
//! Work is queued per job, not per connection: an upload is cut into pieces and
//! each piece is a job (a few pieces, run side by side, where a worker has
//! several threads); each WebSocket utterance is a job. Streaming jobs go
//! ahead of batch jobs so a long upload cannot starve live streams. The queue is
//! bounded; a job that cannot start before its deadline is answered
//! [`PoolError::Saturated`] without running. A panicking job is fenced: its
//! caller gets [`PoolError::Failed`] and the worker rebuilds its recognizer.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::speech::segment::Piece;
use crate::speech::{Engine, Recognizer, SpeechError, Transcript};

/// Jobs that may wait in the queue per worker before new ones are refused.
pub const QUEUE_SLOTS_PER_WORKER: usize = 64;

/// Pieces of an upload one job takes, per encoder thread of a worker. At one
/// thread a job is one piece; with more, the worker runs a job's pieces side
/// by side, one per thread (`Recognizer::transcribe_pieces`), and a few per
/// thread let it balance long pieces against short ones. A live stream's job
/// waits at most one such job.
pub const PIECES_PER_THREAD: usize = 2;

/// Which queue a job goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Live streams (WebSocket): served first.
    Stream,
    /// Uploads: served when no stream job waits.
    Batch,
}

/// Why a job did not produce a result.
#[derive(Debug)]
pub enum PoolError {
    /// The queue is full or the job could not start before its deadline.
    Saturated,
    /// The pool is shutting down.
    ShuttingDown,
    /// The job ran and failed.
    Speech(SpeechError),
    /// The job panicked (a bug); details are in the log.
    Failed,
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Saturated => write!(f, "all workers are busy"),
            PoolError::ShuttingDown => write!(f, "server is shutting down"),
            PoolError::Speech(e) => write!(f, "{e}"),
            PoolError::Failed => write!(f, "internal error while transcribing"),
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Speech(e) => Some(e),
            _ => None,
        }
    }
}

impl From<SpeechError> for PoolError {
    fn from(e: SpeechError) -> Self {
        PoolError::Speech(e)
    }
}

type Task = Box<dyn FnOnce(&mut Recognizer) + Send>;

struct Job {
    task: Task,
    deadline: Option<Instant>,
    /// Called instead of `task` when the deadline passed or the pool stops.
    refuse: Box<dyn FnOnce(PoolError) + Send>,
}

#[derive(Default)]
struct Queues {
    stream: VecDeque<Job>,
    batch: VecDeque<Job>,
}

struct Inner {
    queues: Mutex<Queues>,
    ready: Condvar,
    capacity: usize,
    busy: AtomicUsize,
    stopping: AtomicBool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A poisoned lock only means a panic elsewhere; the queues stay consistent.
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts for `/ready` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Workers.
    pub size: usize,
    /// Workers running a job now.
    pub busy: usize,
    /// Jobs waiting.
    pub waiting: usize,
}

/// The worker pool handle; cheap to share behind an `Arc`.
pub struct Pool {
    inner: Arc<Inner>,
    size: usize,
    /// Pieces of an upload per job (see [`PIECES_PER_THREAD`]).
    pieces_per_job: usize,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("size", &self.size).finish()
    }
}

/// The pending result of a submitted job.
#[derive(Debug)]
pub struct Pending<R> {
    rx: Receiver<Result<R, PoolError>>,
}

impl<R> Pending<R> {
    /// Blocks until the job finished or was refused.
    pub fn wait(self) -> Result<R, PoolError> {
        self.rx.recv().unwrap_or(Err(PoolError::Failed))
    }

    /// The result if the job has finished, without blocking.
    pub fn try_take(&self) -> Option<Result<R, PoolError>> {
        self.rx.try_recv().ok()
    }
}

impl Pool {
    /// Starts `size` workers, each with its own recognizer over `engine`.
    pub fn start(engine: &Arc<Engine>, size: usize) -> Result<Pool, SpeechError> {
        let size = size.max(1);
        let inner = Arc::new(Inner {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
            capacity: size * QUEUE_SLOTS_PER_WORKER,
            busy: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let mut workers = Vec::with_capacity(size);
        for i in 0..size {
            let recognizer = engine.recognizer()?;
            let inner = Arc::clone(&inner);
            let engine = Arc::clone(engine);
            let handle = std::thread::Builder::new()
                .name(format!("gigastt-worker-{i}"))
                .spawn(move || worker_loop(&inner, &engine, recognizer))
                .map_err(|e| SpeechError::Inference(format!("cannot start worker: {e}")))?;
            workers.push(handle);
        }
        let threads = engine.info().encoder_threads;
        let pieces_per_job = if threads > 1 {
            threads * PIECES_PER_THREAD
        } else {
            1
        };
        Ok(Pool {
            inner,
            size,
            pieces_per_job,
            workers: Mutex::new(workers),
        })
    }

    /// Worker count.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Current counts.
    pub fn stats(&self) -> PoolStats {
        let q = self.inner.lock();
        PoolStats {
            size: self.size,
            busy: self.inner.busy.load(Ordering::Relaxed),
            waiting: q.stream.len() + q.batch.len(),
        }
    }

    /// Queues `f`; it must start within `checkout` (None: no deadline).
    pub fn submit<R, F>(
        &self,
        priority: Priority,
        checkout: Option<Duration>,
        f: F,
    ) -> Result<Pending<R>, PoolError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Recognizer) -> Result<R, SpeechError> + Send + 'static,
    {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err(PoolError::ShuttingDown);
        }
        // A zero checkout means "only if a worker is free now": decided here,
        // since any deadline of "now" has passed by the time a worker looks.
        let checkout = match checkout {
            Some(d) if d.is_zero() => {
                let q = self.inner.lock();
                if self.inner.busy.load(Ordering::SeqCst) + q.stream.len() + q.batch.len()
                    >= self.size
                {
                    return Err(PoolError::Saturated);
                }
                None
            }
            other => other,
        };
        let (tx, rx): (SyncSender<Result<R, PoolError>>, _) = sync_channel(1);
        let refuse_tx = tx.clone();
        let inner = Arc::clone(&self.inner);
        let job = Job {
            task: Box::new(move |rec| {
                let result = f(rec).map_err(PoolError::Speech);
                // The worker is free before its caller hears back, so a caller
                // that submits again at once finds it idle.
                inner.busy.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(result);
            }),
            deadline: checkout.map(|d| Instant::now() + d),
            refuse: Box::new(move |e| {
                let _ = refuse_tx.send(Err(e));
            }),
        };
        let mut q = self.inner.lock();
        if q.stream.len() + q.batch.len() >= self.inner.capacity {
            return Err(PoolError::Saturated);
        }
        match priority {
            Priority::Stream => q.stream.push_back(job),
            Priority::Batch => q.batch.push_back(job),
        }
        drop(q);
        self.inner.ready.notify_one();
        Ok(Pending { rx })
    }

    /// Stops taking jobs; queued jobs are refused, running ones finish; joins workers.
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.ready.notify_all();
        let handles = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    /// First step of an upload: one job plans the pieces (VAD). Bound by
    /// `checkout`, so a saturated pool answers before anything is streamed.
    pub fn plan(
        &self,
        samples: &Arc<Vec<f32>>,
        checkout: Duration,
    ) -> Result<Vec<Piece>, PoolError> {
        let s = Arc::clone(samples);
        self.submit(Priority::Batch, Some(checkout), move |rec| {
            rec.plan_pieces(&s)
        })?
        .wait()
    }

    /// Second step: pieces run as batch jobs, at most `size` in flight, stitched
    /// in order. A job is one piece, or a few where workers have several
    /// threads ([`PIECES_PER_THREAD`]). Once admitted an upload runs to the end
    /// (no deadline). `on_event` gets each finished segment, and a heartbeat
    /// every `heartbeat`.
    pub fn transcribe_pieces(
        &self,
        samples: &Arc<Vec<f32>>,
        pieces: &[Piece],
        heartbeat: Duration,
        mut on_event: impl FnMut(Event<'_>),
    ) -> Result<Transcript, PoolError> {
        let mut transcript = Transcript::for_samples(samples.len());
        let mut in_flight = VecDeque::new();
        let mut jobs = pieces.chunks(self.pieces_per_job);
        loop {
            while in_flight.len() < self.size {
                let Some(batch) = jobs.next() else { break };
                let owned = batch.to_vec();
                let s = Arc::clone(samples);
                let pending = self.submit(Priority::Batch, None, move |rec| {
                    let mut words = Vec::with_capacity(owned.len());
                    rec.transcribe_pieces(&s, &owned, |_, w| words.push(w))?;
                    Ok(words)
                })?;
                in_flight.push_back((batch, pending));
            }
            let Some((batch, pending)) = in_flight.pop_front() else {
                break;
            };
            let words = loop {
                match pending.rx.recv_timeout(heartbeat) {
                    Ok(r) => break r?,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => on_event(Event::Heartbeat),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(PoolError::Failed);
                    }
                }
            };
            if words.len() != batch.len() {
                return Err(PoolError::Failed);
            }
            for (piece, words) in batch.iter().zip(words) {
                let before = transcript.segments.len();
                transcript.push_piece(piece, words);
                if transcript.segments.len() > before {
                    on_event(Event::Segment(&transcript));
                }
            }
        }
        Ok(transcript)
    }

    /// Whole upload: [`Pool::plan`] then [`Pool::transcribe_pieces`].
    pub fn transcribe(
        &self,
        samples: Arc<Vec<f32>>,
        checkout: Duration,
    ) -> Result<Transcript, PoolError> {
        let pieces = self.plan(&samples, checkout)?;
        self.transcribe_pieces(&samples, &pieces, Duration::from_secs(3600), |_| {})
    }
}

/// Progress of an upload.
#[derive(Debug)]
pub enum Event<'a> {
    /// A segment finished; the transcript so far (its last segment is new).
    Segment(&'a Transcript),
    /// Nothing finished for a while (keep a stream alive).
    Heartbeat,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker_loop(inner: &Inner, engine: &Arc<Engine>, mut recognizer: Recognizer) {
    loop {
        let job = {
            let mut q = inner.lock();
            loop {
                if inner.stopping.load(Ordering::SeqCst) {
                    let queues = std::mem::take(&mut *q);
                    drop(q);
                    let drained = queues.stream.into_iter().chain(queues.batch);
                    for job in drained {
                        (job.refuse)(PoolError::ShuttingDown);
                    }
                    return;
                }
                if let Some(job) = q.stream.pop_front().or_else(|| q.batch.pop_front()) {
                    // Counted busy while the queue lock is held, so a zero-checkout
                    // submit never sees a job that is neither queued nor busy.
                    inner.busy.fetch_add(1, Ordering::SeqCst);
                    break job;
                }
                q = inner.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        if job.deadline.is_some_and(|d| Instant::now() > d) {
            inner.busy.fetch_sub(1, Ordering::SeqCst);
            (job.refuse)(PoolError::Saturated);
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| (job.task)(&mut recognizer)));
        if outcome.is_err() {
            // The task panicked before it released the worker.
            inner.busy.fetch_sub(1, Ordering::SeqCst);
            // The job's sender was dropped in the unwind: its caller sees Failed.
            log::error!("a transcription job panicked; rebuilding this worker's recognizer");
            match engine.recognizer() {
                Ok(fresh) => recognizer = fresh,
                Err(e) => {
                    log::error!("cannot rebuild recognizer: {e}; worker stops");
                    return;
                }
            }
        }
    }
}
