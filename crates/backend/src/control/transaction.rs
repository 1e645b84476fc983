//! `transaction` (QEMU's qmp_transaction in blockdev.c): a list of actions that
//! take effect all together or not at all. Every node is drained for the whole
//! transaction; each action is prepared in order (it takes effect, keeping what
//! it needs to be undone); if one fails, those prepared are undone in reverse
//! order and its error is the answer; otherwise each commits in order.
//!
//! What each action does at each step follows QEMU 7.2:
//! - bitmap add: prepare adds, abort removes;
//! - bitmap remove: prepare checks and marks the bitmap busy (later actions of
//!   the same transaction cannot use it), commit removes it, abort lets it go;
//! - bitmap clear and merge: prepare changes the bits and keeps the old ones,
//!   abort puts them back;
//! - bitmap enable and disable: prepare switches, abort switches back;
//! - blockdev-snapshot(-sync): prepare puts the overlay on top (a -sync overlay's
//!   file is created and stays on abort, as QEMU leaves it), abort puts the old
//!   top back under its users, read-write again if it was;
//! - blockdev-snapshot-internal-sync: prepare takes the snapshot, abort deletes it;
//! - blockdev-backup, drive-backup: prepare creates the job, commit starts it (as
//!   QEMU's), abort cancels it before it ever ran;
//! - abort: its prepare fails.
//!
//! With `completion-mode=grouped` (backup actions only, as in QEMU) the jobs the
//! transaction starts form a job transaction: each waits in `waiting` until all have
//! done their work, then all go on to `pending` and conclude; when one fails or is
//! cancelled, the others are cancelled.

use super::backup::{BackupArgs, DriveTarget};
use super::bitmaps::BitmapCmd;
use super::graph_ops::SnapshotSync;
use super::jobs::JobOpts;
use super::{generic, Control, OpResult, DRAIN_TIMEOUT};
use crate::control::error::ControlError;
use blocklayer::named_bitmap::{Check, NamedBitmap};
use blocklayer::Node;
use std::sync::Arc;

/// One action of a transaction, its arguments read.
#[derive(Debug)]
pub enum Action {
    /// `blockdev-backup` (no drive target) or `drive-backup`.
    Backup {
        args: BackupArgs,
        opts: JobOpts,
        drive: Option<DriveTarget>,
    },
    Abort,
    Bitmap(BitmapCmd),
    Snapshot {
        node: String,
        overlay: String,
    },
    SnapshotSync(SnapshotSync),
    SnapshotInternal {
        device: String,
        name: String,
    },
}

/// What undoes (or completes) a prepared action.
enum Prepared {
    BitmapAdded {
        node: Arc<Node>,
        name: String,
    },
    BitmapRemoving {
        node: Arc<Node>,
        bitmap: Arc<NamedBitmap>,
    },
    BitmapBits {
        bitmap: Arc<NamedBitmap>,
        old: Vec<u8>,
    },
    BitmapSwitched {
        node: Arc<Node>,
        bitmap: Arc<NamedBitmap>,
        was_enabled: bool,
    },
    Snapshot {
        base: String,
        overlay: String,
        base_was_writable: bool,
    },
    SnapshotInternal {
        device: String,
        name: String,
    },
    Backup {
        job: String,
    },
}

impl Control {
    /// Runs `actions` (each with its QAPI type name) as one transaction;
    /// `grouped` is `completion-mode=grouped`, which none of these actions
    /// supports (QEMU: only backup jobs do).
    pub fn transaction(&mut self, actions: Vec<(String, Action)>, grouped: bool) -> OpResult<()> {
        if grouped {
            let other = actions
                .iter()
                .find(|(_, a)| !matches!(a, Action::Backup { .. }));
            if let Some((kind, _)) = other {
                return Err(ControlError::generic(format!(
                    "Action '{kind}' does not support Transaction property completion-mode = \
                     grouped"
                )));
            }
        }
        if actions.is_empty() {
            return Ok(());
        }
        let all: Vec<Arc<Node>> = self.graph.nodes().cloned().collect();
        let drained = self.graph.drain_all(&all, DRAIN_TIMEOUT).map_err(generic)?;
        if grouped {
            // The jobs the actions start form one job transaction.
            self.job_txn = Some(self.next_job_txn);
            self.next_job_txn += 1;
        }
        let mut done: Vec<Prepared> = Vec::with_capacity(actions.len());
        let mut failed = None;
        // The backup actions' jobs are created in prepare and start at commit.
        self.defer_job_starts();
        for (_, action) in actions {
            match self.prepare(action) {
                Ok(p) => done.push(p),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.job_txn = None;
        let r = match failed {
            Some(e) => {
                self.end_deferring(false);
                for p in done.into_iter().rev() {
                    self.abort_action(p);
                }
                Err(e)
            }
            None => {
                for p in done {
                    self.commit_action(p);
                }
                self.end_deferring(true);
                Ok(())
            }
        };
        drop(drained);
        self.graph.collect_unused();
        r
    }

    fn prepare(&mut self, action: Action) -> OpResult<Prepared> {
        match action {
            Action::Abort => Err(ControlError::generic(
                "Transaction aborted using Abort action",
            )),
            Action::Backup { args, opts, drive } => {
                let job = opts.job_id.clone().unwrap_or_default();
                self.backup(args, opts, drive)?;
                Ok(Prepared::Backup { job })
            }
            Action::Bitmap(cmd) => self.prepare_bitmap(cmd),
            Action::Snapshot { node, overlay } => {
                let was = self.graph.get(&node).is_some_and(|n| !n.is_read_only());
                self.blockdev_snapshot(&node, &overlay)?;
                Ok(Prepared::Snapshot {
                    base: node,
                    overlay,
                    base_was_writable: was,
                })
            }
            Action::SnapshotSync(a) => {
                let base = a.node_name.clone().unwrap_or_default();
                let overlay = a.snapshot_node_name.clone().unwrap_or_default();
                let was = self.graph.get(&base).is_some_and(|n| !n.is_read_only());
                self.blockdev_snapshot_sync(a)?;
                Ok(Prepared::Snapshot {
                    base,
                    overlay,
                    base_was_writable: was,
                })
            }
            Action::SnapshotInternal { device, name } => {
                self.snapshot_internal(&device, &name)?;
                Ok(Prepared::SnapshotInternal { device, name })
            }
        }
    }

    /// `blockdev-backup` (`drive` is None) or `drive-backup`.
    pub fn backup(
        &mut self,
        args: BackupArgs,
        opts: JobOpts,
        drive: Option<DriveTarget>,
    ) -> OpResult<()> {
        match drive {
            None => self.blockdev_backup(args, opts),
            Some(d) => self.drive_backup(args, opts, d),
        }
    }

    fn prepare_bitmap(&mut self, cmd: BitmapCmd) -> OpResult<Prepared> {
        match cmd {
            BitmapCmd::Add(a) => {
                self.bitmap_add(&a)?;
                let node = self.lookup_device(&a.node)?;
                Ok(Prepared::BitmapAdded { node, name: a.name })
            }
            BitmapCmd::Remove { node, name } => {
                let (node, bitmap) = self.bitmap_lookup(&node, &name)?;
                bitmap.check(Check::REMOVE).map_err(ControlError::msg)?;
                bitmap.set_busy(true);
                Ok(Prepared::BitmapRemoving { node, bitmap })
            }
            BitmapCmd::Clear { node, name } => {
                let (_, bitmap) = self.bitmap_lookup(&node, &name)?;
                let old = bitmap.bits().to_le_bytes();
                self.bitmap_clear(&node, &name)?;
                Ok(Prepared::BitmapBits { bitmap, old })
            }
            BitmapCmd::Merge {
                node,
                target,
                sources,
            } => {
                let (_, bitmap) = self.bitmap_lookup(&node, &target)?;
                let old = bitmap.bits().to_le_bytes();
                self.bitmap_merge(&node, &target, &sources)?;
                Ok(Prepared::BitmapBits { bitmap, old })
            }
            BitmapCmd::Enable { node, name } => self.prepare_switch(&node, &name, true),
            BitmapCmd::Disable { node, name } => self.prepare_switch(&node, &name, false),
            BitmapCmd::Sha256 { .. } => Err(ControlError::generic(
                "x-debug-block-dirty-bitmap-sha256 is not a transaction action",
            )),
        }
    }

    fn prepare_switch(&mut self, node: &str, name: &str, enable: bool) -> OpResult<Prepared> {
        let (n, bitmap) = self.bitmap_lookup(node, name)?;
        let was_enabled = bitmap.enabled();
        self.bitmap_enable(node, name, enable)?;
        Ok(Prepared::BitmapSwitched {
            node: n,
            bitmap,
            was_enabled,
        })
    }

    fn commit_action(&mut self, p: Prepared) {
        if let Prepared::BitmapRemoving { node, bitmap } = p {
            bitmap.set_busy(false);
            if let Err(e) = self.bitmap_remove(node.name(), bitmap.name()) {
                log::error!(
                    "transaction: removing bitmap '{}' of '{}': {}",
                    bitmap.name(),
                    node.name(),
                    e.desc
                );
            }
        }
    }

    fn abort_action(&mut self, p: Prepared) {
        match p {
            Prepared::BitmapAdded { node, name } => {
                node.remove_named_bitmap(&name);
            }
            Prepared::BitmapRemoving { bitmap, .. } => bitmap.set_busy(false),
            Prepared::BitmapBits { bitmap, old } => {
                bitmap.bits().clear();
                bitmap.bits().set_from_le_bytes(0, &old);
            }
            Prepared::BitmapSwitched {
                node,
                bitmap,
                was_enabled,
            } => {
                if was_enabled {
                    node.enable_bitmap(&bitmap);
                } else {
                    node.disable_bitmap(&bitmap);
                }
            }
            Prepared::Snapshot {
                base,
                overlay,
                base_was_writable,
            } => self.undo_snapshot(&base, &overlay, base_was_writable),
            Prepared::Backup { job } => self.cancel_jobs_sync(&[job]),
            Prepared::SnapshotInternal { device, name } => {
                if let Err(e) = self.snapshot_delete_internal(&device, None, Some(&name)) {
                    log::error!(
                        "transaction: deleting snapshot '{name}' of '{device}' again: {}",
                        e.desc
                    );
                }
            }
        }
    }

    /// Puts `base` back where `overlay` went on top of it: read-write again first
    /// if it was (its users write), then under the overlay's users.
    fn undo_snapshot(&mut self, base: &str, overlay: &str, base_was_writable: bool) {
        if base_was_writable {
            if let Some(b) = self.graph.get(base).filter(|b| b.is_read_only()) {
                if let Err(e) = self.graph.reopen(&b, true) {
                    log::error!("transaction: '{base}' stays read-only: {e}");
                }
            }
        }
        let (Some(b), Some(ov)) = (self.graph.get(base), self.graph.get(overlay)) else {
            return;
        };
        let r = self
            .graph
            .drain_all(&[b.clone(), ov.clone()], DRAIN_TIMEOUT)
            .and_then(|_d| {
                self.graph.replace_node(&ov, &b, None)?;
                self.graph.set_backing(&ov, None)
            });
        if let Err(e) = r {
            log::error!("transaction: taking overlay '{overlay}' off '{base}' again: {e}");
        }
    }
}
