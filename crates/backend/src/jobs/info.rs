//! What QMP reports of jobs, typed: QEMU's `JobInfo` (`query-jobs`),
//! `BlockJobInfo` (`query-block-jobs`) and the data of the job events, serialised
//! with QEMU's member names in the order vubd writes them; the QMP layer
//! serialises them.

use super::Status;
use blocklayer::error_policy::IoStatus;
use blocklayer::events::IoOperation;
use serde::Serialize;

/// QEMU's `JobInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    pub id: String,
    /// QEMU's `JobType`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: Status,
    pub current_progress: u64,
    pub total_progress: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// QEMU's `BlockJobInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The job id (QEMU's name for it in block job replies).
    pub device: String,
    pub len: u64,
    pub offset: u64,
    pub busy: bool,
    pub paused: bool,
    pub speed: u64,
    pub io_status: IoStatus,
    pub ready: bool,
    pub status: Status,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobStatusChange<'a> {
    pub id: &'a str,
    pub status: Status,
}

/// `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED` (never with `error`) and
/// `BLOCK_JOB_READY` (never with `error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobEvent<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub device: &'a str,
    pub len: u64,
    pub offset: u64,
    pub speed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

/// `BLOCK_JOB_PENDING`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobPending<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: &'a str,
}

/// `BLOCK_JOB_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockJobError<'a> {
    pub device: &'a str,
    pub operation: IoOperation,
    /// `BlockErrorAction`: `ignore`, `report` or `stop`.
    pub action: &'static str,
}

blocklayer::serialize_by_name!(Status);

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire shapes of `JobInfo` and `BlockJobInfo`, pinned.
    #[test]
    fn job_info_as_vubd_writes_it() {
        let j = JobInfo {
            id: "m0".into(),
            kind: "mirror",
            status: Status::Ready,
            current_progress: 1024,
            total_progress: 4096,
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&j).unwrap(),
            r#"{"id":"m0","type":"mirror","status":"ready","current-progress":1024,"total-progress":4096}"#
        );
        let failed = JobInfo {
            status: Status::Concluded,
            error: Some("Input/output error".into()),
            ..j
        };
        assert_eq!(
            serde_json::to_string(&failed).unwrap(),
            r#"{"id":"m0","type":"mirror","status":"concluded","current-progress":1024,"total-progress":4096,"error":"Input/output error"}"#
        );
        let b = BlockJobInfo {
            kind: "stream",
            device: "s0".into(),
            len: 4096,
            offset: 512,
            busy: true,
            paused: false,
            speed: 0,
            io_status: IoStatus::Nospace,
            ready: false,
            status: Status::Running,
            auto_finalize: true,
            auto_dismiss: false,
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"type":"stream","device":"s0","len":4096,"offset":512,"busy":true,"paused":false,"speed":0,"io-status":"nospace","ready":false,"status":"running","auto-finalize":true,"auto-dismiss":false}"#
        );
    }

    /// The data of the job events, pinned.
    #[test]
    fn job_events_as_vubd_writes_them() {
        fn json(v: &impl Serialize) -> String {
            serde_json::to_string(v).unwrap()
        }
        assert_eq!(
            json(&JobStatusChange {
                id: "j",
                status: Status::Pending
            }),
            r#"{"id":"j","status":"pending"}"#
        );
        assert_eq!(
            json(&BlockJobEvent {
                kind: "commit",
                device: "j",
                len: 8,
                offset: 4,
                speed: 0,
                error: Some("e"),
            }),
            r#"{"type":"commit","device":"j","len":8,"offset":4,"speed":0,"error":"e"}"#
        );
        assert_eq!(
            json(&BlockJobPending {
                kind: "mirror",
                id: "j"
            }),
            r#"{"type":"mirror","id":"j"}"#
        );
        assert_eq!(
            json(&BlockJobError {
                device: "j",
                operation: IoOperation::Read,
                action: "stop"
            }),
            r#"{"device":"j","operation":"read","action":"stop"}"#
        );
    }
}
