//! Block jobs as QMP sees them (QEMU's job state machine and `JOB_STATUS_CHANGE`).
//!
//! The only job so far is `blockdev-create`: it runs on the control thread from start
//! to end within the command, going through QEMU's states (created, running, waiting,
//! pending, concluded; aborting on failure) with an event for each, and stays
//! concluded until `job-dismiss`, as QEMU's create jobs (manual dismiss) do.

use crate::qmp::events::EventBus;
use crate::qmp::wire::QmpError;
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub kind: &'static str,
    pub status: &'static str,
    pub error: Option<String>,
    pub progress: u64,
}

#[derive(Default)]
pub struct Jobs {
    jobs: BTreeMap<String, Job>,
}

impl Jobs {
    fn set(&mut self, events: &EventBus, id: &str, status: &'static str) {
        if let Some(j) = self.jobs.get_mut(id) {
            j.status = status;
        }
        events.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({ "id": id, "status": status })),
        );
    }

    /// Runs `work` as a job called `id` of type `kind`.
    pub fn run(
        &mut self,
        events: &EventBus,
        id: &str,
        kind: &'static str,
        work: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), QmpError> {
        if self.jobs.contains_key(id) {
            return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
        }
        if !blocklayer::options::coerce::is_valid_id(id) {
            return Err(QmpError::generic(format!("Invalid job ID '{id}'")));
        }
        self.jobs.insert(
            id.to_string(),
            Job {
                id: id.to_string(),
                kind,
                status: "created",
                error: None,
                progress: 0,
            },
        );
        events.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({ "id": id, "status": "created" })),
        );
        self.set(events, id, "running");
        match work() {
            Ok(()) => {
                if let Some(j) = self.jobs.get_mut(id) {
                    j.progress = 1;
                }
                self.set(events, id, "waiting");
                self.set(events, id, "pending");
            }
            Err(e) => {
                if let Some(j) = self.jobs.get_mut(id) {
                    j.error = Some(e);
                }
                self.set(events, id, "aborting");
            }
        }
        self.set(events, id, "concluded");
        Ok(())
    }

    /// `job-dismiss`: forgets a concluded job.
    pub fn dismiss(&mut self, events: &EventBus, id: &str) -> Result<(), QmpError> {
        let Some(job) = self.jobs.get(id) else {
            return Err(QmpError::new(
                crate::qmp::wire::ErrorClass::DeviceNotActive,
                "Job not found",
            ));
        };
        if job.status != "concluded" {
            return Err(QmpError::generic(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'dismiss'",
                job.status
            )));
        }
        self.jobs.remove(id);
        events.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({ "id": id, "status": "null" })),
        );
        Ok(())
    }

    /// `query-jobs`
    pub fn query(&self) -> Value {
        Value::Array(
            self.jobs
                .values()
                .map(|j| {
                    let mut v = json!({
                        "id": j.id,
                        "type": j.kind,
                        "status": j.status,
                        "current-progress": j.progress,
                        "total-progress": 1,
                    });
                    if let Some(e) = &j.error {
                        v["error"] = json!(e);
                    }
                    v
                })
                .collect(),
        )
    }
}
