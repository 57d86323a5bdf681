//! Reloading the configuration: on SIGHUP, and when the file or any file it names
//! (certificates, keys, CA bundles, cohort files, the admin token) changes. An invalid
//! new configuration is logged and counted, and the running one stays in force.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::server::Running;

/// How often files are checked for changes.
pub const POLL: Duration = Duration::from_secs(2);

type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (f.clone(), meta)
        })
        .collect()
}

/// Watches for SIGHUP and file changes until `stop`, reloading `path` into `running`.
pub async fn watch(running: Running, path: PathBuf, stop: CancellationToken) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = fingerprint(&running.control.snapshot().config.files());
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let signalled = tokio::select! {
            _ = hangup => true,
            _ = tokio::time::sleep(POLL) => false,
            _ = stop.cancelled() => return,
        };
        let files = running.control.snapshot().config.files();
        let now = fingerprint(&files);
        if signalled {
            tracing::info!("SIGHUP: reloading");
        } else if now == seen {
            continue;
        } else {
            // Let a writer finish (editors write in several steps).
            tokio::time::sleep(Duration::from_millis(200)).await;
            tracing::info!("configuration files changed: reloading");
        }
        // Fingerprint before reading, so a change made during the reload is seen next time.
        let before = fingerprint(&files);
        reload(&running, &path).await;
        // The configuration in force may name other files now.
        let in_force = running.control.snapshot().config.files();
        seen = if in_force == files {
            before
        } else {
            fingerprint(&in_force)
        };
    }
}

async fn reload(running: &Running, path: &Path) {
    // Errors are logged and counted inside.
    let _ = running.reload_from(path).await;
}
