//! The data path's threads (thread per core, as nginx's workers, Pingora and linkerd's proxy do):
//! with more than one usable CPU, `tokenbroker run` serves the proxy listeners on N worker
//! threads, `tb-worker-0` to `tb-worker-{N-1}`, each running a tokio
//! current_thread runtime of its own (I/O and timers enabled). Every proxy listener has one
//! listening socket per worker, bound to the same address with `SO_REUSEPORT` (the kernel spreads
//! new connections over them), and one accept loop per socket on that socket's worker; a client
//! connection, its requests and the upstream connections they take from the pool (one set per
//! worker, see `proxy::forward::pool`) then live on one thread, with no cross-thread wake-ups and
//! no work-stealing. The control plane (broker renewals, the admin listener, reloads, telemetry)
//! runs on the main thread's runtime. `cli` starts the workers and hands their runtimes to
//! `app::AppHandle::start_on`; in-process use (`AppHandle::start`, `ProxyHandle::start`) runs
//! everything on the caller's runtime, as before.
//!
//! A worker's index is known on its thread ([`current`]), for the pool and the logs.
//!
//! Must never: end a worker's runtime while the process still serves (its listening sockets
//! would keep taking connections that no one accepts); [`Workers::stop`] comes after the proxy
//! has drained.

use std::cell::Cell;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// The index of the worker whose thread this is.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker running on this thread; `None` off the workers (the main runtime, a
/// test's runtime).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// How many workers `workers` (the `[limits] workers` key) means: 0 is one per usable CPU
/// (`available_parallelism`, which follows `taskset` and a container's CPU quota).
pub fn count(workers: usize) -> usize {
    match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The worker threads and their runtimes. Dropping it stops them (as [`Workers::stop`]).
pub struct Workers {
    runtimes: Vec<Handle>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Workers {
    /// Starts `n` worker threads, each with a current_thread runtime, idle until given tasks.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Workers {
            runtimes: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for index in 0..n {
            let (started, handle) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("tb-worker-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    INDEX.with(|i| i.set(Some(index)));
                    let _ = started.send(Ok(runtime.handle().clone()));
                    // Runs the tasks the proxy spawns here until told to stop (or until the
                    // `Workers` is gone); what is left then (idle upstream connections, their
                    // reaper) is dropped on this thread with the runtime.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            let runtime = handle
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread ended at its start"))??;
            workers.runtimes.push(runtime);
            workers.threads.push((stop, thread));
        }
        Ok(workers)
    }

    /// Each worker's runtime, by index.
    pub fn runtimes(&self) -> &[Handle] {
        &self.runtimes
    }

    /// Stops every worker (their remaining tasks are dropped) and waits for their threads.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let threads: Vec<_> = self
            .threads
            .drain(..)
            .map(|(stop, thread)| {
                let _ = stop.send(());
                thread
            })
            .collect();
        for (index, thread) in threads.into_iter().enumerate() {
            if thread.join().is_err() {
                eprintln!("tokenbroker: worker {index} ended with a panic");
            }
        }
        self.runtimes.clear();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_named_threads_that_know_their_index() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.runtimes().len(), 2);
        assert_eq!(current(), None);
        for (i, runtime) in workers.runtimes().iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            runtime.spawn(async move {
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send((current(), name));
            });
            let (index, name) = rx.recv().unwrap();
            assert_eq!(index, Some(i));
            assert_eq!(name.as_deref(), Some(&*format!("tb-worker-{i}")));
        }
        workers.stop();
    }

    #[test]
    fn zero_means_one_per_usable_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(count(0), cpus);
        assert_eq!(count(3), 3);
    }
}
