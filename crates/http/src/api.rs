//! The JSON resources and actions under `/api/v1`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bulwark_daemon::Handles;
use bulwark_daemon::config::VmConfig;
use bulwark_daemon::control::RunNowRefused;
use bulwark_daemon::daemon::VmSchedule;
use bulwark_daemon::history::{JobRecord, JobState, StorageSample};
use futures::TryStreamExt;
use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::view::{self, HistoryView, VmPoints};

/// What the last verify said of a point.
#[derive(Debug, Clone)]
struct Verified {
    ok: bool,
    at: Timestamp,
}

/// The state every handler shares.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) h: Handles,
    pub(crate) started: Timestamp,
    pub(crate) overdue_grace: Duration,
    verified: Mutex<HashMap<String, Verified>>,
    last_sample: Mutex<Option<StorageSample>>,
    storage_lock: tokio::sync::Mutex<()>,
    /// A background storage measurement is under way (requests do not wait for it).
    measuring: std::sync::atomic::AtomicBool,
    pub(crate) histograms: crate::metrics::JobHistograms,
    /// What read requests are served from (see [`crate::view`]).
    pub(crate) view: crate::view::View,
}

/// How long a storage measurement is reused (listing a big vault is not free).
const STORAGE_TTL: SignedDuration = SignedDuration::from_secs(15);
/// A measurement made for a reader (not after a job) is recorded in the history only when the
/// last recorded one is older than this: a scraper every 15 s must not flood the history.
const RECORD_EVERY: SignedDuration = SignedDuration::from_hours(1);

pub(crate) type Shared = Arc<App>;

/// An API error: a status and a message, as `{"error": "..."}`.
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<bulwark_vault::Error> for ApiError {
    fn from(e: bulwark_vault::Error) -> Self {
        let status = match e {
            bulwark_vault::Error::NoSuchPoint { .. } => StatusCode::NOT_FOUND,
            bulwark_vault::Error::InvalidName { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<bulwark_controller::Error> for ApiError {
    fn from(e: bulwark_controller::Error) -> Self {
        match e {
            bulwark_controller::Error::Vault(v) => v.into(),
            bulwark_controller::Error::RestoreTarget { .. } => {
                ApiError(StatusCode::CONFLICT, e.to_string())
            }
            e => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<bulwark_daemon::Error> for ApiError {
    fn from(e: bulwark_daemon::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// See [`App::job_out`].
#[derive(Debug, serde::Serialize)]
struct JobOut<'a> {
    #[serde(flatten)]
    record: &'a JobRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cancel_requested: Option<bool>,
}

/// `GET /jobs`'s body.
#[derive(Debug, serde::Serialize)]
struct JobsOut<'a> {
    jobs: Vec<JobOut<'a>>,
    running: Vec<i64>,
}

/// Runs a job-database call on a blocking thread (SQLite never runs on the async workers).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, bulwark_daemon::Error> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("history: {e}")))?
        .map_err(ApiError::from)
}

impl App {
    pub(crate) fn new(h: Handles, overdue_grace: Duration) -> App {
        App {
            started: Timestamp::now(),
            overdue_grace,
            verified: Mutex::new(HashMap::new()),
            last_sample: Mutex::new(None),
            storage_lock: tokio::sync::Mutex::new(()),
            measuring: std::sync::atomic::AtomicBool::new(false),
            view: crate::view::View::default(),
            histograms: crate::metrics::JobHistograms::start(&h.control),
            h,
        }
    }

    fn vm(&self, name: &str) -> Result<&VmConfig, ApiError> {
        self.h
            .config
            .vms
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("no VM {name:?} is configured"),
                )
            })
    }

    /// The VM's protection: `protected`, `overdue` (a scheduled run passed more than the
    /// grace period ago with no success since), `never` (no success yet, none overdue),
    /// with the last success and the run it is overdue for.
    pub(crate) fn protection(&self, vm: &VmConfig, jobs: &[JobRecord], now: Timestamp) -> Value {
        let last_success = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.state,
                    JobState::Completed | JobState::CompletedWithWarnings
                )
            })
            .filter_map(|j| j.ended)
            .max();
        // The same rule as the daemon's overdue notifications: without a success yet, only
        // runs since the daemon started can be missed.
        let missed = bulwark_daemon::alerts::missed_run(
            &VmSchedule::of(vm),
            last_success,
            self.started,
            self.overdue_grace,
            now,
        );
        let state = match (missed, last_success) {
            (Some(_), _) => "overdue",
            (None, Some(_)) => "protected",
            (None, None) => "never",
        };
        json!({
            "state": state,
            "overdue": missed.is_some(),
            "last_success": last_success,
            "missed_run": missed,
            "grace_seconds": self.overdue_grace.as_secs(),
        })
    }

    fn vm_json(&self, vm: &VmConfig, hv: &HistoryView, now: Timestamp) -> Value {
        let jobs = hv.jobs_of(&vm.name);
        let c = vm.policy.consistency();
        let next = VmSchedule::of(vm).next_after(now);
        let schedule = match vm.schedule_override {
            Some(d) => format!("every {}s (schedule_override_seconds)", d.as_secs()),
            None => vm.policy.schedule().to_string(),
        };
        let last = jobs.iter().find(|j| j.state != JobState::Skipped);
        let running = last
            .filter(|j| j.state == JobState::InProgress)
            .map(|j| j.id);
        json!({
            "name": vm.name,
            "disks": vm.disks.iter().map(|d| json!({"name": d.name, "path": d.path})).collect::<Vec<_>>(),
            "agent": vm.agent.as_ref().map(|a| a.address.to_string()),
            "policy": policy_name(vm),
            "schedule": schedule,
            "consistency_wanted": c.wanted.to_string(),
            "consistency_minimum": c.minimum.to_string(),
            "next_run": next,
            "last_job": last.map(|j| self.job_json(j)),
            "running_job": running,
            "protection": self.protection(vm, jobs, now),
        })
    }

    fn job_json(&self, j: &JobRecord) -> Value {
        serde_json::to_value(self.job_out(j)).unwrap_or(Value::Null)
    }

    /// A job as served: its record, and for a running job its live progress and whether a
    /// cancel was asked. Serialized straight into the response (no `Value` tree per job).
    fn job_out<'a>(&self, j: &'a JobRecord) -> JobOut<'a> {
        let live = (j.state == JobState::InProgress).then(|| {
            let progress = self.h.control.progress(j.id).unwrap_or_default();
            let total: u64 = progress.values().map(|d| d.total).sum();
            let done: u64 = progress.values().map(|d| d.done).sum();
            (
                json!({ "disks": progress, "total": total, "done": done }),
                self.h.control.cancel_requested(j.id),
            )
        });
        JobOut {
            record: j,
            progress: live.as_ref().map(|l| l.0.clone()),
            cancel_requested: live.map(|l| l.1),
        }
    }

    /// The last measurement of the vault's size, with the recorded measurements (oldest
    /// first, from the view). A request never waits for a measurement but the very first: a
    /// measurement older than its TTL is served while a new one is made in the background.
    pub(crate) async fn storage(
        self: &Arc<Self>,
    ) -> Result<(StorageSample, Arc<HistoryView>), ApiError> {
        let last = *self.last_sample.lock().unwrap_or_else(|p| p.into_inner());
        let sample = match last {
            Some(l) => {
                let stale = Timestamp::now().duration_since(l.at) >= STORAGE_TTL;
                if stale && !self.measuring.swap(true, Ordering::AcqRel) {
                    let app = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = app.measure(false).await {
                            tracing::warn!(error = ?e, "cannot measure the vault");
                        }
                        app.measuring.store(false, Ordering::Release);
                    });
                }
                l
            }
            None => self.measure(false).await?,
        };
        Ok((sample, self.view.history()))
    }

    /// Measures the vault (`force`: even if the last measurement is fresh, and record it: the
    /// sample taken after each job).
    pub(crate) async fn measure(&self, force: bool) -> Result<StorageSample, ApiError> {
        let _one = self.storage_lock.lock().await;
        let now = Timestamp::now();
        let last = *self.last_sample.lock().unwrap_or_else(|p| p.into_inner());
        if !force && let Some(l) = last.filter(|l| now.duration_since(l.at) < STORAGE_TTL) {
            return Ok(l);
        }
        let metas: Vec<_> = self
            .h
            .vault
            .store()
            .list(None)
            .try_collect()
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut s = StorageSample {
            at: now,
            stored: 0,
            objects: 0,
            blocks: 0,
            logical: 0,
            points: 0,
        };
        for m in &metas {
            s.objects += 1;
            s.stored += m.size;
            if m.location.as_ref().starts_with("blocks/") {
                s.blocks += 1;
            }
        }
        let list = self.h.vault.list_points(None).await?;
        s.points = list.points.len() as u64;
        s.logical = list
            .points
            .iter()
            .flat_map(|p| p.disks.iter().map(|d| d.size))
            .sum();
        *self.last_sample.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        // The job database off the async threads.
        let history = self.h.history.clone();
        tokio::task::spawn_blocking(move || {
            let record = force
                || history
                    .storage_samples(1)?
                    .last()
                    .is_none_or(|r| now.duration_since(r.at) >= RECORD_EVERY);
            if record {
                history.record_storage(&s)?;
            }
            Ok::<_, bulwark_daemon::Error>(())
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("history: {e}")))??;
        Ok(s)
    }
}

fn policy_name(vm: &VmConfig) -> String {
    vm.policy
        .name()
        .unwrap_or(vm.policy.file_name())
        .to_string()
}

/// `GET /healthz`: anonymous liveness.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The history part of the view (once it includes every job end announced so far), or the
/// error of its last read.
pub(crate) async fn history_view(app: &App) -> Result<Arc<HistoryView>, ApiError> {
    app.view
        .caught_up(app.h.control.ends(), view::CATCH_UP)
        .await;
    let hv = app.view.history();
    match &hv.error {
        Some(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.clone())),
        None => Ok(hv),
    }
}

/// `GET /api/v1/vms`.
pub(crate) async fn vms(State(app): State<Shared>) -> ApiResult {
    let now = Timestamp::now();
    let hv = history_view(&app).await?;
    let vms: Vec<Value> = app
        .h
        .config
        .vms
        .iter()
        .map(|vm| app.vm_json(vm, &hv, now))
        .collect();
    Ok(Json(json!({ "vms": vms })))
}

/// `GET /api/v1/vms/{vm}`: the VM and its points.
pub(crate) async fn vm(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let vm = app.vm(&name)?;
    let hv = history_view(&app).await?;
    let mut v = app.vm_json(vm, &hv, Timestamp::now());
    v["points"] = points_json(&app, &name)?;
    Ok(Json(v))
}

fn points_json(app: &App, vm: &str) -> Result<Value, ApiError> {
    let vv = app.view.vault();
    if let Some(e) = &vv.error {
        return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.clone()));
    }
    let empty = VmPoints::default();
    let list = vv.points.get(vm).unwrap_or(&empty);
    let verified = app.verified.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::with_capacity(list.points.len());
    for e in list.points.iter().rev() {
        let p = &e.point;
        let mut tiers = vec!["vault"];
        if e.kept {
            tiers.insert(0, "snapshot");
        }
        let verify = match verified.get(&format!("{}/{}", p.vm, p.id)) {
            Some(v) => json!({"state": if v.ok { "ok" } else { "damaged" }, "at": v.at}),
            None => json!({"state": "unverified"}),
        };
        out.push(json!({
            "id": p.id,
            "vm": p.vm,
            "created": p.created,
            "committed": p.committed,
            "consistency": {
                "reached": p.consistency.reached.to_string(),
                "wanted": p.consistency.wanted.to_string(),
                "reasons": p.consistency.reasons,
                "freeze_window_ms": p.consistency.freeze_window_ms,
            },
            "tiers": tiers,
            "size": p.disks.iter().map(|d| d.size).sum::<u64>(),
            "bytes_uploaded": p.disks.iter().map(|d| d.stats.bytes_uploaded).sum::<u64>(),
            "disks": p.disks.iter().map(|d| json!({"name": d.name, "size": d.size})).collect::<Vec<_>>(),
            "policy": p.policy,
            "verify": verify,
        }));
    }
    let broken: Vec<Value> = list
        .broken
        .iter()
        .map(|(k, e)| json!({"key": k, "error": e}))
        .collect();
    Ok(json!({ "points": out, "broken": broken }))
}

/// `GET /api/v1/vms/{vm}/points`.
pub(crate) async fn points(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    app.vm(&name)?;
    Ok(Json(points_json(&app, &name)?))
}

#[derive(Debug, Deserialize)]
pub(crate) struct JobsQuery {
    vm: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/jobs?vm=&limit=`: newest first (default 50, at most 1000). From the view
/// when it holds enough jobs; else (a VM no longer configured, more than the view keeps of
/// one VM) from the database, off the async threads.
pub(crate) async fn jobs(
    State(app): State<Shared>,
    Query(q): Query<JobsQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(50).min(1000);
    let hv = history_view(&app).await?;
    let cached: Option<&[JobRecord]> = match &q.vm {
        None => Some(&hv.recent),
        Some(vm) if limit <= view::VM_JOBS => hv.by_vm.get(vm).map(Vec::as_slice),
        Some(_) => None,
    };
    let read;
    let list: &[JobRecord] = match cached {
        Some(list) => &list[..limit.min(list.len())],
        None => {
            let history = app.h.history.clone();
            let vm = q.vm.clone();
            read = blocking(move || history.jobs(vm.as_deref(), limit)).await?;
            &read
        }
    };
    let body = JobsOut {
        jobs: list.iter().map(|j| app.job_out(j)).collect(),
        running: app.h.control.running(),
    };
    Ok(Json(body).into_response())
}

/// `GET /api/v1/jobs/{id}`: from the view when it holds the job, else from the database.
pub(crate) async fn job(State(app): State<Shared>, Path(id): Path<i64>) -> ApiResult {
    if let Some(j) = history_view(&app).await?.job(id) {
        return Ok(Json(app.job_json(j)));
    }
    let history = app.h.history.clone();
    match blocking(move || history.job(id)).await? {
        Some(j) => Ok(Json(app.job_json(&j))),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no job {id}"))),
    }
}

/// `GET /api/v1/storage`: bytes stored, objects, the logical size of the live points and
/// their ratio, and the measurements since the daemon started.
pub(crate) async fn storage(State(app): State<Shared>) -> ApiResult {
    let (s, hv) = app.storage().await?;
    let all = &hv.samples;
    let growth = match (all.first(), all.last()) {
        (Some(a), Some(b)) if b.at.duration_since(a.at) >= SignedDuration::from_mins(1) => {
            let days = b.at.duration_since(a.at).as_secs_f64() / 86400.0;
            Some((b.stored as f64 - a.stored as f64) / days)
        }
        _ => None,
    };
    Ok(Json(json!({
        "vault": app.h.vault.location(),
        "encrypted": app.h.vault.is_encrypted(),
        "measured": s.at,
        "stored_bytes": s.stored,
        "objects": s.objects,
        "blocks": s.blocks,
        "points": s.points,
        "logical_bytes": s.logical,
        "dedup_factor": (s.stored > 0).then_some(s.logical as f64 / (s.stored as f64).max(1.0)),
        "growth_bytes_per_day": growth,
        "history": all.iter().map(|s| json!({"at": s.at, "stored_bytes": s.stored, "logical_bytes": s.logical})).collect::<Vec<_>>(),
    })))
}

/// `GET /api/v1/policies`: each policy with the VMs that use it.
pub(crate) async fn policies(State(app): State<Shared>) -> ApiResult {
    let mut by: BTreeMap<String, (Value, Vec<String>)> = BTreeMap::new();
    for vm in &app.h.config.vms {
        let p = &vm.policy;
        let c = p.consistency();
        let r = p.retention();
        let entry = by.entry(policy_name(vm)).or_insert_with(|| {
            (
                json!({
                    "name": policy_name(vm),
                    "file": p.file_name(),
                    "schedule": p.schedule().to_string(),
                    "retention": r.to_string(),
                    "instant_restore_days": r.instant_restore_days,
                    "soft_delete_days": r.soft_delete_days,
                    "consistency_wanted": c.wanted.to_string(),
                    "consistency_minimum": c.minimum.to_string(),
                }),
                Vec::new(),
            )
        });
        entry.1.push(vm.name.clone());
    }
    let list: Vec<Value> = by
        .into_values()
        .map(|(mut v, vms)| {
            v["vms"] = json!(vms);
            v
        })
        .collect();
    Ok(Json(json!({ "policies": list })))
}

/// `GET /api/v1/leases`: the vault's leases (running backups, prunes, GC), from the view.
pub(crate) async fn leases(State(app): State<Shared>) -> ApiResult {
    let now = Timestamp::now();
    let vv = app.view.vault();
    if let Some(e) = &vv.error {
        return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.clone()));
    }
    let out: Vec<Value> = vv
        .leases
        .iter()
        .map(|(key, r)| match r {
            Ok(rec) => json!({"key": key, "live": rec.is_live(now), "lease": rec}),
            Err(e) => json!({"key": key, "error": e}),
        })
        .collect();
    Ok(Json(json!({ "leases": out })))
}

/// `POST /api/v1/vms/{vm}/run`: 202 with the job id; 404 unknown VM; 409 already running.
pub(crate) async fn run_now(
    State(app): State<Shared>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    match app.h.control.run_now(&name).await {
        Ok(id) => {
            tracing::info!(vm = %name, job = id, "run now (API)");
            Ok((StatusCode::ACCEPTED, Json(json!({ "job": id, "vm": name }))))
        }
        Err(e @ RunNowRefused::UnknownVm(_)) => Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
        Err(e @ RunNowRefused::AlreadyRunning { .. }) => {
            Err(ApiError(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

/// `POST /api/v1/jobs/{id}/cancel`: 202 when the job runs (it stops at its next safe point);
/// 409 when it has ended; 404 when there is no such job.
pub(crate) async fn cancel(
    State(app): State<Shared>,
    Path(id): Path<i64>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if app.h.control.cancel(id) {
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "job": id, "cancelling": true })),
        ));
    }
    let history = app.h.history.clone();
    match blocking(move || history.job(id)).await? {
        Some(j) => Err(ApiError(
            StatusCode::CONFLICT,
            format!("job {id} is not running (it is {})", j.state),
        )),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no job {id}"))),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerifyBody {
    vm: Option<String>,
}

/// `POST /api/v1/verify` `{"vm": optional}`: reads and checks every object the points need.
pub(crate) async fn verify(State(app): State<Shared>, body: Option<Json<VerifyBody>>) -> ApiResult {
    let body = body.map(|b| b.0).unwrap_or_default();
    if let Some(vm) = &body.vm {
        app.vm(vm)?;
    }
    let list = app.h.vault.list_points(body.vm.as_deref()).await?;
    let report = app.h.vault.verify(body.vm.as_deref(), &|_, _| {}).await?;
    let broken = report.broken_points();
    let now = Timestamp::now();
    {
        let mut v = app.verified.lock().unwrap_or_else(|p| p.into_inner());
        for p in &list.points {
            let key = format!("{}/{}", p.vm, p.id);
            let ok = !broken.contains(key.as_str());
            v.insert(key, Verified { ok, at: now });
        }
    }
    let problems: Vec<Value> = report
        .problems
        .iter()
        .map(|p| json!({"key": p.key, "message": p.message, "points": p.points}))
        .collect();
    tracing::info!(vm = ?body.vm, ok = report.is_ok(), problems = problems.len(), "verify (API)");
    if !report.is_ok()
        && let Some(n) = &app.h.notifier
    {
        n.notify(crate::notify::verify_damage(
            body.vm.as_deref(),
            &problems,
            &broken,
            now,
        ));
    }
    Ok(Json(json!({
        "ok": report.is_ok(),
        "points": report.points,
        "manifests": report.manifests,
        "blocks": report.blocks,
        "bytes": report.bytes,
        "problems": problems,
        "broken_points": broken,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PruneBody {
    #[serde(default)]
    dry_run: bool,
}

/// `POST /api/v1/vms/{vm}/prune` `{"dry_run": bool}`: the VM's policy retention now.
pub(crate) async fn prune(
    State(app): State<Shared>,
    Path(name): Path<String>,
    body: Option<Json<PruneBody>>,
) -> ApiResult {
    let vm = app.vm(&name)?;
    let dry_run = body.map(|b| b.0.dry_run).unwrap_or(false);
    let r = bulwark_controller::prune(
        &app.h.vault,
        &vm.name,
        &vm.policy,
        Timestamp::now(),
        dry_run,
    )
    .await?;
    if !dry_run {
        for id in &r.deleted {
            if let Ok(Some(k)) = app.h.store.get(&vm.name, id)
                && let Err(e) = app.h.store.remove(&k)
            {
                tracing::warn!(vm = %vm.name, point = %id, error = %e, "cannot remove the kept snapshot of a pruned point");
            }
        }
    }
    if !dry_run {
        app.view.invalidate_vault();
    }
    tracing::info!(vm = %vm.name, dry_run, deleted = r.deleted.len(), purged = r.purged.len(), "prune (API)");
    Ok(Json(serde_json::to_value(&r).unwrap_or(Value::Null)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestoreBody {
    #[serde(default = "latest")]
    point: String,
    disk: String,
    to: PathBuf,
    #[serde(default)]
    force: bool,
}

fn latest() -> String {
    "latest".into()
}

/// `POST /api/v1/vms/{vm}/restore` `{"point", "disk", "to", "force"}`: restores one disk to a
/// raw image at `to` (an absolute path on the daemon's host; never replaced unless `force`).
pub(crate) async fn restore(
    State(app): State<Shared>,
    Path(name): Path<String>,
    Json(body): Json<RestoreBody>,
) -> ApiResult {
    app.vm(&name)?;
    if !body.to.is_absolute() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("to: {} is not an absolute path", body.to.display()),
        ));
    }
    let mut req = bulwark_controller::RestoreRequest::new(&name, &body.point, &body.disk, &body.to);
    req.force = body.force;
    req.snapshots = Some(app.h.store.clone());
    tracing::info!(vm = %name, point = %body.point, disk = %body.disk, to = %body.to.display(), "restore (API)");
    // The restore future is not `Send` (a higher-ranked lifetime in its block stream): it
    // runs on a blocking thread driving the daemon's runtime.
    let vault = app.h.vault.clone();
    let rt = tokio::runtime::Handle::current();
    let r = tokio::task::spawn_blocking(move || {
        rt.block_on(bulwark_controller::run_restore(req, &vault))
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("restore worker: {e}"),
        )
    })??;
    Ok(Json(serde_json::to_value(&r).unwrap_or(Value::Null)))
}
