//! The storage history: after every job that ran (not a skipped one) the vault is measured
//! and the measurement recorded in the job database, for the console's storage plot and the
//! growth per day of `GET /api/v1/storage`.

use bulwark_daemon::history::JobState;

use crate::api::Shared;

/// Starts the task that measures the vault after each job's end.
pub(crate) fn start(app: Shared) {
    let mut ended = app.h.control.subscribe();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match ended.recv().await {
                Ok(e) if e.record.state == JobState::Skipped => continue,
                Ok(_) => {}
                // Missed ends: one measurement covers them all.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
            match app.measure(true).await {
                Ok(s) => tracing::debug!(
                    stored = s.stored,
                    logical = s.logical,
                    "storage measured after a job"
                ),
                Err(e) => tracing::warn!(error = ?e, "cannot measure the vault after a job"),
            }
        }
    });
}
