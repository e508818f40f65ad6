//! Password hashing on a fixed set of threads. Argon2id takes 19 MiB per hash by design; on the
//! runtime's blocking pool every concurrent login could get a thread of its own, each keeping
//! that memory (the service reached about 300 MB after a few dozen logins). Here at most
//! `threads` hashes run at once and at most `QUEUE` wait: the memory is bounded by the thread
//! count, and a burst beyond the queue is answered 503 instead of growing the process.

use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use common::ApiError;

const QUEUE: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

pub struct Hashers {
    jobs: SyncSender<Job>,
}

impl Hashers {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (jobs, rx) = sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("hash-{i}")).spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })?;
        }
        Ok(Self { jobs })
    }

    /// Runs `f` on a hashing thread.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.jobs.try_send(job) {
            Ok(()) => rx.await.map_err(|_| ApiError::internal("a hashing thread stopped")),
            Err(TrySendError::Full(_)) => Err(ApiError::Unavailable("too many sign-ups and logins at once; try again in a moment".into())),
            Err(TrySendError::Disconnected(_)) => Err(ApiError::internal("the hashing threads are gone")),
        }
    }
}
