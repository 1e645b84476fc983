//! The internal snapshot table.

use thiserror::Error;

/// Largest snapshot table accepted, in bytes.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data per entry accepted.
pub const MAX_EXTRA: u32 = 1024;

/// Errors in the snapshot table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// The table is malformed.
    #[error("invalid snapshot table: {0}")]
    Invalid(String),
}

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest run time, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size when taken (from extra data, if present).
    pub disk_size: Option<u64>,
    /// Instruction count of a record/replay run (from extra data; `None` when
    /// absent or all ones, QEMU's "no count").
    pub icount: Option<u64>,
    /// Extra data as stored (kept on rewrite).
    pub extra: Vec<u8>,
}

/// Size of the extra data QEMU writes for a new snapshot: VM state size,
/// disk size and icount, 8 bytes each.
pub const NEW_EXTRA: usize = 24;

/// What the caller decides about a new snapshot; the image fills in the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    /// Name (must not be taken by another snapshot).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest run time, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count (`None`: not recorded).
    pub icount: Option<u64>,
}

impl NewSnapshot {
    /// A snapshot called `name`, dated now (to the microsecond, as QEMU dates
    /// them), with no guest run time and no instruction count.
    pub fn now(name: &str) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        NewSnapshot {
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            icount: None,
        }
    }
}

/// Parses `count` entries from `buf`; returns them and the bytes used.
pub fn parse_table(
    buf: &[u8],
    count: u32,
    cluster_size: u64,
) -> Result<(Vec<Snapshot>, usize), SnapshotError> {
    let bad = |s: &str| SnapshotError::Invalid(s.to_string());
    let mut off = 0usize;
    let mut out = Vec::new();
    for _ in 0..count {
        if off + 40 > buf.len() {
            return Err(bad("table truncated"));
        }
        let b = &buf[off..];
        let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
        let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
        let l1_table_offset = be64(0);
        let l1_size = be32(8);
        let id_len = u16::from_be_bytes([b[12], b[13]]) as usize;
        let name_len = u16::from_be_bytes([b[14], b[15]]) as usize;
        let extra_len = be32(36);
        if extra_len > MAX_EXTRA {
            return Err(bad("extra data too large"));
        }
        if l1_table_offset % cluster_size != 0 {
            return Err(bad("snapshot L1 table not cluster aligned"));
        }
        if l1_size as u64 * 8 > crate::header::MAX_L1_BYTES {
            return Err(bad("snapshot L1 table too large"));
        }
        let extra_len = extra_len as usize;
        let total = 40 + extra_len + id_len + name_len;
        if off + total > buf.len() {
            return Err(bad("table truncated"));
        }
        let extra = b[40..40 + extra_len].to_vec();
        let e64 = |o: usize| {
            (extra.len() >= o + 8).then(|| u64::from_be_bytes(extra[o..o + 8].try_into().unwrap()))
        };
        let s = 40 + extra_len;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(&b[s..s + id_len]).into_owned(),
            name: String::from_utf8_lossy(&b[s + id_len..s + id_len + name_len]).into_owned(),
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: be64(24),
            vm_state_size: e64(0).unwrap_or(be32(32) as u64),
            disk_size: e64(8),
            icount: e64(16).filter(|&n| n != u64::MAX),
            extra,
        });
        off += total.div_ceil(8) * 8;
    }
    Ok((out, off))
}

/// Serialises a table.
pub fn serialize_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut v = Vec::new();
    for s in snaps {
        let start = v.len();
        v.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        v.extend_from_slice(&s.l1_size.to_be_bytes());
        v.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        v.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        v.extend_from_slice(&s.date_sec.to_be_bytes());
        v.extend_from_slice(&s.date_nsec.to_be_bytes());
        v.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        v.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        let mut extra = s.extra.clone();
        if extra.len() < 16 {
            extra.resize(16, 0);
        }
        extra[0..8].copy_from_slice(&s.vm_state_size.to_be_bytes());
        extra[8..16].copy_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        if extra.len() >= NEW_EXTRA {
            extra[16..24].copy_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        }
        v.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        v.extend_from_slice(&extra);
        v.extend_from_slice(s.id.as_bytes());
        v.extend_from_slice(s.name.as_bytes());
        let l = start + (v.len() - start).div_ceil(8) * 8;
        v.resize(l, 0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let s = Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 3,
            id: "1".into(),
            name: "snap one".into(),
            date_sec: 5,
            date_nsec: 6,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            disk_size: Some(1 << 30),
            icount: None,
            extra: [0u64.to_be_bytes(), (1u64 << 30).to_be_bytes()].concat(),
        };
        let with_icount = Snapshot {
            icount: Some(77),
            extra: [0, 1u64 << 30, 77].map(u64::to_be_bytes).concat(),
            ..s.clone()
        };
        let without = Snapshot {
            extra: [0, 1u64 << 30, u64::MAX].map(u64::to_be_bytes).concat(),
            ..s.clone()
        };
        let all = [s.clone(), with_icount, without, s.clone()];
        let t = serialize_table(&all);
        let (p, used) = parse_table(&t, 4, 65536).unwrap();
        assert_eq!(p, all);
        assert_eq!(used, t.len());
        assert!(parse_table(&t[..t.len() - 9], 4, 65536).is_err());
    }
}

mod ops {
    use super::{serialize_table, NewSnapshot, Snapshot, NEW_EXTRA};
    use crate::image::{Error, Qcow2, Result, TableKind};
    use crate::io::QcowIo;
    use crate::layout::{self, L2Entry, COPIED, OFFSET_MASK};

    impl<I: QcowIo> Qcow2<I> {
        /// Adds `delta` to the refcount of every L2 table and cluster reachable
        /// from an L1 table.
        async fn tree_refcounts(&self, l1: &[u64], delta: i64) -> Result<()> {
            let g = self.g;
            let cs = g.cluster_size;
            for &e in l1 {
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let entries: Vec<(u64, u64)> = self
                    .read_table(TableKind::L2, l2, |t| {
                        (0..g.l2_entries as usize)
                            .map(|i| layout::l2_entry(&t.data, i, g.extended))
                            .collect()
                    })
                    .await?;
                for (raw, bm) in entries {
                    match L2Entry::decode(&g, raw, bm) {
                        Ok(L2Entry::Normal { host, .. }) if host != 0 => {
                            self.rc_add(host / cs, delta).await?;
                        }
                        Ok(L2Entry::Compressed { raw }) => {
                            let (_, _, s, l) = g.compressed_range(raw);
                            for c in s / cs..=(s + l - 1) / cs {
                                self.rc_add(c, delta).await?;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => return Err(self.corrupt(format!("L2 table {l2:#x}: {e}")).await),
                    }
                }
                self.rc_add(l2 / cs, delta).await?;
            }
            Ok(())
        }

        /// Sets the COPIED flags of the active L1 and L2 tables from the refcounts.
        async fn fix_copied_flags(&self) -> Result<()> {
            let g = self.g;
            let cs = g.cluster_size;
            let (l1, l1_off) = {
                let st = self.st();
                (st.l1.clone(), st.hdr.l1_table_offset)
            };
            for (i, &e) in l1.iter().enumerate() {
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let want = self.rc_read(l2 / cs).await? == 1;
                let ne = if want { e | COPIED } else { e & !COPIED };
                if ne != e {
                    self.st().l1[i] = ne;
                    self.io
                        .write_at(l1_off + i as u64 * 8, &ne.to_be_bytes())
                        .await?;
                }
                let step = if g.extended { 2 } else { 1 };
                let raws: Vec<u64> = self
                    .with_table(TableKind::L2, l2, |t| {
                        (0..g.l2_entries as usize)
                            .map(|j| layout::get_u64(&t.data, j * step))
                            .collect()
                    })
                    .await?;
                let mut changes = Vec::new();
                for (j, raw) in raws.into_iter().enumerate() {
                    let host = raw & OFFSET_MASK;
                    if raw & layout::COMPRESSED != 0 || host == 0 {
                        continue;
                    }
                    let want = self.rc_read(host / cs).await? == 1;
                    let nr = if want { raw | COPIED } else { raw & !COPIED };
                    if nr != raw {
                        changes.push((j, nr));
                    }
                }
                if !changes.is_empty() {
                    self.with_table(TableKind::L2, l2, |t| {
                        for (j, nr) in changes {
                            layout::put_u64(&mut t.data, j * step, nr);
                        }
                        t.dirty = true;
                        t.gen += 1;
                    })
                    .await?;
                }
            }
            Ok(())
        }

        /// Writes a new snapshot table and points the header at it.
        async fn write_snapshot_table(&self, snaps: Vec<Snapshot>) -> Result<()> {
            let cs = self.g.cluster_size;
            let table = serialize_table(&snaps);
            let (old_off, old_len) = {
                let st = self.st();
                (st.hdr.snapshots_offset, st.snapshot_table_len)
            };
            let new_off = if table.is_empty() {
                0
            } else {
                let k = (table.len() as u64).div_ceil(cs);
                let off = self.alloc_clusters(k).await?;
                self.io.write_at(off, &table).await?;
                off
            };
            self.write_dirty_refcounts().await?;
            self.io.flush().await?;
            {
                let mut st = self.st();
                st.hdr.nb_snapshots = snaps.len() as u32;
                st.hdr.snapshots_offset = new_off;
                st.snapshot_table_len = table.len() as u64;
                st.snapshots = snaps;
            }
            self.write_header().await?;
            self.io.flush().await?;
            if old_len > 0 {
                for c in old_off / cs..(old_off + old_len).div_ceil(cs) {
                    self.rc_add(c, -1).await?;
                }
            }
            Ok(())
        }

        /// The snapshot `name_or_id` names: an id first, then a name (as
        /// qemu-img resolves `-a` and `-d`).
        fn find_snapshot(&self, name_or_id: &str) -> Result<usize> {
            let st = self.st();
            st.snapshots
                .iter()
                .position(|s| s.id == name_or_id)
                .or_else(|| st.snapshots.iter().position(|s| s.name == name_or_id))
                .ok_or_else(|| Error::SnapshotNotFound(name_or_id.to_string()))
        }

        /// Creates an internal snapshot of the current disk state, dated now.
        pub async fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
            self.snapshot_create_with(NewSnapshot::now(name)).await
        }

        /// Creates an internal snapshot of the current disk state with the
        /// caller's date, guest clock and instruction count. Names are unique.
        pub async fn snapshot_create_with(&self, new: NewSnapshot) -> Result<Snapshot> {
            if self.g.data_file {
                return Err(Error::Unsupported(
                    "internal snapshots with an external data file".into(),
                ));
            }
            let _all = self.lock_range(0, u64::MAX, false).await;
            let _meta = self.meta.lock().await;
            self.check_writable_pub()?;
            self.flush_locked().await?;
            let g = self.g;
            let cs = g.cluster_size;
            if self.st().snapshots.iter().any(|s| s.name == new.name) {
                return Err(Error::SnapshotExists(new.name));
            }
            let (l1, size) = {
                let st = self.st();
                (st.l1.clone(), st.hdr.size)
            };
            // References first, then the COPIED flags cleared, all stable
            // before the snapshot table names the new snapshot: a crash
            // leaks, never leaves a shared cluster marked unshared.
            self.tree_refcounts(&l1, 1).await?;
            self.fix_copied_flags().await?;
            self.flush_locked().await?;
            let l1: Vec<u64> = self.st().l1.clone();
            let bytes = l1.len() as u64 * 8;
            let l1_off = if l1.is_empty() {
                0
            } else {
                self.alloc_clusters(bytes.div_ceil(cs)).await?
            };
            let mut b = vec![0u8; bytes as usize];
            for (i, &e) in l1.iter().enumerate() {
                layout::put_u64(&mut b, i, e & !COPIED);
            }
            if !b.is_empty() {
                self.io.write_at(l1_off, &b).await?;
            }
            let mut snaps = self.st().snapshots.clone();
            let id = snaps
                .iter()
                .filter_map(|s| s.id.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
                + 1;
            let snap = Snapshot {
                l1_table_offset: l1_off,
                l1_size: l1.len() as u32,
                id: id.to_string(),
                name: new.name,
                date_sec: new.date_sec,
                date_nsec: new.date_nsec,
                vm_clock_nsec: new.vm_clock_nsec,
                vm_state_size: 0,
                disk_size: Some(size),
                icount: new.icount,
                extra: vec![0; NEW_EXTRA],
            };
            snaps.push(snap.clone());
            self.write_snapshot_table(snaps).await?;
            {
                let mut st = self.st();
                for c in 0..bytes.div_ceil(cs) {
                    st.meta_clusters.insert(l1_off + c * cs);
                }
            }
            self.fix_copied_flags().await?;
            self.flush_locked().await?;
            Ok(snap)
        }

        /// Deletes an internal snapshot (by id, else by name), freeing what
        /// only it used; returns it.
        pub async fn snapshot_delete(&self, name_or_id: &str) -> Result<Snapshot> {
            self.delete_where(|img| img.find_snapshot(name_or_id)).await
        }

        /// Deletes the first snapshot whose id is `id` (if given) and whose
        /// name is `name` (if given), as QMP's
        /// `blockdev-snapshot-delete-internal-sync` selects it; returns it.
        pub async fn snapshot_delete_matching(
            &self,
            id: Option<&str>,
            name: Option<&str>,
        ) -> Result<Snapshot> {
            let what = match (id, name) {
                (None, None) => return Err(Error::SnapshotNotFound(String::new())),
                (Some(i), None) => format!("id {i:?}"),
                (None, Some(n)) => format!("name {n:?}"),
                (Some(i), Some(n)) => format!("id {i:?} and name {n:?}"),
            };
            self.delete_where(|img| {
                img.st()
                    .snapshots
                    .iter()
                    .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
                    .ok_or_else(|| Error::SnapshotNotFound(what.clone()))
            })
            .await
        }

        /// Deletes the snapshot `pick` selects once the image is locked.
        async fn delete_where(&self, pick: impl Fn(&Self) -> Result<usize>) -> Result<Snapshot> {
            let _all = self.lock_range(0, u64::MAX, false).await;
            let _meta = self.meta.lock().await;
            self.check_writable_pub()?;
            let i = pick(self)?;
            self.flush_locked().await?;
            self.st().freed_clusters = Some(Vec::new());
            let r = self.delete_at(i).await;
            let freed = self.st().freed_clusters.take().unwrap_or_default();
            if r.is_ok() && self.st().pass_discard_snapshot {
                self.punch_clusters(freed).await;
            }
            r
        }

        /// The body of a snapshot deletion, locks held and metadata flushed.
        async fn delete_at(&self, i: usize) -> Result<Snapshot> {
            let cs = self.g.cluster_size;
            let mut snaps = self.st().snapshots.clone();
            let snap = snaps.remove(i);
            self.write_snapshot_table(snaps).await?;
            let mut b = vec![0u8; snap.l1_size as usize * 8];
            self.io.read_at(snap.l1_table_offset, &mut b).await?;
            let l1: Vec<u64> = b
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            self.tree_refcounts(&l1, -1).await?;
            for c in 0..(b.len() as u64).div_ceil(cs) {
                self.rc_add(snap.l1_table_offset / cs + c, -1).await?;
                self.st()
                    .meta_clusters
                    .remove(&(snap.l1_table_offset + c * cs));
            }
            self.fix_copied_flags().await?;
            self.flush_locked().await?;
            Ok(snap)
        }

        /// Reverts the disk to an internal snapshot (by id or name).
        pub async fn snapshot_revert(&self, name_or_id: &str) -> Result<()> {
            if self.g.data_file {
                return Err(Error::Unsupported(
                    "internal snapshots with an external data file".into(),
                ));
            }
            let _all = self.lock_range(0, u64::MAX, false).await;
            let _meta = self.meta.lock().await;
            self.check_writable_pub()?;
            self.flush_locked().await?;
            let g = self.g;
            let cs = g.cluster_size;
            let i = self.find_snapshot(name_or_id)?;
            let snap = self.st().snapshots[i].clone();
            let size = snap.disk_size.unwrap_or_else(|| self.size());
            let need = crate::header::l1_entries_for(size, g.cluster_bits, g.extended);
            let mut b = vec![0u8; snap.l1_size as usize * 8];
            self.io.read_at(snap.l1_table_offset, &mut b).await?;
            let mut new_l1: Vec<u64> = b
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()) & !COPIED)
                .collect();
            if (new_l1.len() as u64) < need {
                new_l1.resize(need as usize, 0);
            }
            self.tree_refcounts(&new_l1, 1).await?;
            let k = (new_l1.len() as u64 * 8).div_ceil(cs).max(1);
            let off = self.alloc_clusters(k).await?;
            let mut t = vec![0u8; (k * cs) as usize];
            for (i, &e) in new_l1.iter().enumerate() {
                layout::put_u64(&mut t, i, e);
            }
            self.io.write_at(off, &t).await?;
            self.write_dirty_refcounts().await?;
            self.io.flush().await?;
            let (old_l1, old_off) = {
                let mut st = self.st();
                let old = std::mem::replace(&mut st.l1, new_l1);
                let old_off = st.hdr.l1_table_offset;
                st.hdr.l1_table_offset = off;
                st.hdr.l1_size = st.l1.len() as u32;
                st.hdr.size = size;
                for c in 0..k {
                    st.meta_clusters.insert(off + c * cs);
                }
                (old, old_off)
            };
            self.write_header().await?;
            self.io.flush().await?;
            // What only the old active tree held is freed now.
            self.st().freed_clusters = Some(Vec::new());
            let r = self.release_tree(&old_l1, old_off).await;
            let freed = self.st().freed_clusters.take().unwrap_or_default();
            if r.is_ok() && self.st().pass_discard_snapshot {
                self.punch_clusters(freed).await;
            }
            r
        }

        /// Drops the references of a replaced active L1 tree and its table.
        async fn release_tree(&self, old_l1: &[u64], old_off: u64) -> Result<()> {
            let cs = self.g.cluster_size;
            self.tree_refcounts(old_l1, -1).await?;
            for c in 0..(old_l1.len() as u64 * 8).div_ceil(cs) {
                self.rc_add(old_off / cs + c, -1).await?;
            }
            self.fix_copied_flags().await?;
            self.flush_locked().await
        }
    }
}
