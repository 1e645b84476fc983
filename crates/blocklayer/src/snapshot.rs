//! Internal snapshots as the block layer reports them: QEMU's `QEMUSnapshotInfo`,
//! and the QMP `SnapshotInfo` shape it is shown in (`query-named-block-nodes`,
//! `blockdev-snapshot-delete-internal-sync`, `qemu-img info --output=json`).
//!
//! Drivers that keep internal snapshots (qcow2) implement the snapshot methods of
//! [`crate::driver::Driver`]; the others keep their defaults, which fail with ENOTSUP.

use serde::{Serialize, Serializer};

pub use qcow::NewSnapshot;

/// One internal snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id (a number in qcow2).
    pub id: String,
    /// Name (QEMU's "tag").
    pub name: String,
    /// Bytes of saved VM state (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest run time when taken, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count of a record/replay run, if recorded.
    pub icount: Option<u64>,
}

/// QEMU's QMP `SnapshotInfo`, what a [`SnapshotInfo`] serialises as (the guest
/// clock split into seconds and nanoseconds; `icount` only when recorded).
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct QmpSnapshotInfo<'a> {
    id: &'a str,
    name: &'a str,
    vm_state_size: u64,
    date_sec: u64,
    date_nsec: u32,
    vm_clock_sec: u64,
    vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
}

impl Serialize for SnapshotInfo {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        QmpSnapshotInfo {
            id: &self.id,
            name: &self.name,
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_sec: self.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: self.vm_clock_nsec % 1_000_000_000,
            icount: self.icount,
        }
        .serialize(s)
    }
}

impl From<&qcow::Snapshot> for SnapshotInfo {
    fn from(s: &qcow::Snapshot) -> Self {
        SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: u64::from(s.date_sec),
            date_nsec: s.date_nsec,
            vm_clock_nsec: s.vm_clock_nsec,
            icount: s.icount,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_shape() {
        let s = SnapshotInfo {
            id: "3".into(),
            name: "before upgrade".into(),
            vm_state_size: 0,
            date_sec: 1_700_000_000,
            date_nsec: 250,
            vm_clock_nsec: 61_500_000_000,
            icount: None,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"id":"3","name":"before upgrade","vm-state-size":0,"date-sec":1700000000,"date-nsec":250,"vm-clock-sec":61,"vm-clock-nsec":500000000}"#
        );
        let with = SnapshotInfo {
            icount: Some(0),
            ..s
        };
        assert!(serde_json::to_string(&with)
            .unwrap()
            .ends_with(r#""vm-clock-nsec":500000000,"icount":0}"#));
    }
}
