//! The tokio runtime the proxy runs on: a work-stealing runtime with `workers` worker
//! threads (default: one per CPU the process may use).
//!
//! One worker is not a current-thread runtime: the current-thread scheduler made 0.79×
//! nginx's req/s at 1 KiB against 0.96× (BENCHMARKS, *One worker*). That gain was first
//! read as the multi-thread scheduler's LIFO slot (a task woken by the running one runs
//! next). With one worker the slot is now turned off, so tasks run in the order they were
//! woken: the slot let one request's chain of wake-ups (client connection, request,
//! upstream connection, and back) jump every task already waiting, and the requests behind
//! it waited longer. Without it req/s stayed level and the 1 KiB p99 at `-c4` came down from
//! 1.30× nginx's to 1.01× and 1.07× (BENCHMARKS, *The fourteenth session*). With more
//! workers the slot stays: it keeps a request's chain on one worker, where stealing could
//! move it, and two workers without it showed a longer tail at `-c64`.
//!
//! `disable_lifo_slot` is one of tokio's unstable APIs: `.cargo/config.toml` builds with
//! `--cfg tokio_unstable`. A build without it (a `RUSTFLAGS` of one's own replaces the
//! config's) keeps the slot, and `tests::one_worker_runs_tasks_in_the_order_they_were_woken`
//! fails.

/// Builds the runtime. `workers`: `server.workers`.
pub fn build(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let one = match workers {
        Some(n) => n == 1,
        None => std::thread::available_parallelism().map_or(true, |n| n.get() == 1),
    };
    if one {
        #[cfg(tokio_unstable)]
        builder.disable_lifo_slot();
    }
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// Two tasks spawned in turn by a running one run in that order, as nginx serves
    /// connections in the order their events came: with the LIFO slot, the second would
    /// run first, ahead of every task already waiting.
    #[test]
    fn one_worker_runs_tasks_in_the_order_they_were_woken() {
        let rt = super::build(Some(1)).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let seen = order.clone();
        rt.block_on(async move {
            let first = seen.clone();
            tokio::spawn(async move {
                let a = tokio::spawn({
                    let seen = first.clone();
                    async move { seen.lock().unwrap().push("woken first") }
                });
                let b = tokio::spawn({
                    let seen = first.clone();
                    async move { seen.lock().unwrap().push("woken second") }
                });
                let _ = (a.await, b.await);
            })
            .await
            .unwrap();
        });
        assert_eq!(*order.lock().unwrap(), ["woken first", "woken second"]);
    }
}
