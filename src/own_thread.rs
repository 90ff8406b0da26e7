//! Work that must not wait behind the shared runtime: a single-threaded runtime on an OS
//! thread of its own. Thousands of workers starting at once, or CPU-bound work that never
//! yields, can keep every thread of the shared runtime busy for seconds; what runs here (lease
//! renewal, the LISTEN connection, the health checks) keeps its timing all the same.
//!
//! Database connections follow the runtime that opens them (tokio-postgres drives each on a
//! task of that runtime), so a pool used here should be used only here.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A running thread: where to spawn more work on it, and when it has stopped.
#[derive(Debug)]
pub struct OwnThread {
    /// Spawns tasks on the thread's runtime; they run while its main future runs.
    pub handle: Handle,
    /// Completes when the thread has stopped: its main future ended (or panicked) and every
    /// task on its runtime was dropped.
    pub stopped: oneshot::Receiver<()>,
}

/// Runs `main` on a new thread named `name` with a single-threaded runtime of its own; the
/// thread ends when `main` does.
///
/// # Errors
/// The runtime or the thread cannot be created.
pub fn spawn<F>(name: &str, main: F) -> std::io::Result<OwnThread>
where
    F: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(name)
        .build()?;
    let handle = runtime.handle().clone();
    let (done, stopped) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(main);
            // Its tasks (the connection drivers) end before the thread says it stopped.
            drop(runtime);
            let _ = done.send(());
        })?;
    Ok(OwnThread { handle, stopped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_spawned_on_the_thread_runs_on_it_and_the_thread_stops_with_its_main_future() {
        let stop = tokio_util::sync::CancellationToken::new();
        let thread = spawn("dsreg-test-own", {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        })
        .unwrap();
        let name = thread
            .handle
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("dsreg-test-own"));
        stop.cancel();
        thread.stopped.await.unwrap();
    }
}
