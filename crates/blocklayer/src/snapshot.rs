//! Internal snapshots as the block layer reports them: QEMU's `QEMUSnapshotInfo`,
//! and the QMP `SnapshotInfo` shape it is shown in (`query-named-block-nodes`,
//! `blockdev-snapshot-delete-internal-sync`, `qemu-img info --output=json`).
//!
//! Drivers that keep internal snapshots (qcow2) implement the snapshot methods of
//! [`crate::driver::Driver`]; the others keep their defaults, which fail with ENOTSUP.

use serde_json::{json, Value};

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

impl SnapshotInfo {
    /// QEMU's QMP `SnapshotInfo` (the guest clock split into seconds and
    /// nanoseconds; `icount` only when recorded).
    pub fn to_qmp(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec / 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        });
        if let Some(n) = self.icount {
            v["icount"] = json!(n);
        }
        v
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
            s.to_qmp(),
            json!({"id": "3", "name": "before upgrade", "vm-state-size": 0,
                   "date-sec": 1_700_000_000u64, "date-nsec": 250, "vm-clock-sec": 61,
                   "vm-clock-nsec": 500_000_000})
        );
        let with = SnapshotInfo {
            icount: Some(0),
            ..s
        };
        assert_eq!(with.to_qmp()["icount"], 0);
    }
}
