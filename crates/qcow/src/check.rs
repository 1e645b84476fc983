//! Consistency check and repair, like `qemu-img check [-r leaks|all]`:
//! reference counts are rebuilt from every structure that uses clusters
//! and compared with the refcount blocks.

use crate::image::{Error, Qcow2, Result, TableKind};
use crate::io::QcowIo;
use crate::layout::{self, L2Entry, COPIED, OFFSET_MASK};
use std::collections::BTreeMap;

/// Most clusters a check will count (bounds its memory).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Only report.
    None,
    /// Fix refcounts that are too high (leaked clusters).
    Leaks,
    /// Fix every refcount and COPIED flag.
    All,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions found (refcount too low, invalid entries, wrong flags).
    pub corruptions: u64,
    /// Leaked clusters found (refcount too high).
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Of the corruptions: COPIED flags that disagree with the refcount in
    /// the file but are harmless, because the cluster has exactly one
    /// reference (a flag set where a leak raised the refcount), or because
    /// the flag is clear (writes copy needlessly). A crash in the middle of a
    /// snapshot operation may leave them. QEMU counts them as corruptions
    /// too, and `Repair::All` fixes them.
    pub harmless_flag_errors: u64,
    /// One line per finding.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Nothing was found.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0
    }
    /// Nothing is left unrepaired.
    pub fn is_consistent_now(&self) -> bool {
        self.corruptions == self.corruptions_fixed && self.leaks == self.leaks_fixed
    }
}

struct Counter {
    refs: Vec<u32>,
    cs: u64,
    report: CheckReport,
}

impl Counter {
    fn inc(&mut self, off: u64, len: u64, times: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        if last >= self.refs.len() as u64 {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR {what} at {off:#x} is past the end of the file"
            ));
            return;
        }
        for c in first..=last {
            let r = &mut self.refs[c as usize];
            *r = r.saturating_add(times.min(u32::MAX as u64) as u32);
        }
    }
    fn error(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(msg);
    }
}

impl<I: QcowIo> Qcow2<I> {
    /// Checks the image and optionally repairs it.
    pub async fn check(&self, repair: Repair) -> Result<CheckReport> {
        let _meta = self.meta.lock().await;
        let (mut report, rebuilt) = self.check_pass(repair).await?;
        if rebuilt {
            // Refcount blocks were created (maybe moving the refcount
            // table): count again on the repaired structure.
            let (again, _) = self.check_pass(repair).await?;
            report.corruptions += again.corruptions;
            report.leaks += again.leaks;
            report.corruptions_fixed += again.corruptions_fixed;
            report.leaks_fixed += again.leaks_fixed;
            report.harmless_flag_errors += again.harmless_flag_errors;
            report.messages.extend(again.messages);
        }
        Ok(report)
    }

    /// One counting pass; also says whether refcount blocks were created.
    async fn check_pass(&self, repair: Repair) -> Result<(CheckReport, bool)> {
        let writable = {
            let st = self.st();
            st.writable && !st.corrupt
        };
        if repair != Repair::None && !writable {
            return Err(Error::ReadOnly);
        }
        if writable {
            self.flush_locked().await?;
        }
        let g = self.g;
        let cs = g.cluster_size;
        let file_len = self.io.len().await?;
        let nclusters = file_len.div_ceil(cs);
        if nclusters > MAX_CHECK_CLUSTERS {
            return Err(Error::Unsupported("image too large to check".into()));
        }
        let mut k = Counter {
            refs: vec![0; nclusters as usize],
            cs,
            report: CheckReport::default(),
        };
        let mut rebuilt = false;
        let (hdr, l1, mut rt, snaps, snap_len) = {
            let st = self.st();
            (
                st.hdr.clone(),
                st.l1.clone(),
                st.rt.clone(),
                st.snapshots.clone(),
                st.snapshot_table_len,
            )
        };
        k.inc(0, cs, 1, "header");
        // L1 tables: the active one and the snapshots'.
        let mut l2_mult: BTreeMap<u64, u64> = BTreeMap::new();
        // First guest cluster each L2 table maps (for data file checks).
        let mut l2_guest: BTreeMap<u64, u64> = BTreeMap::new();
        let mut tables: Vec<(Vec<u64>, u64, bool)> = vec![(l1, hdr.l1_table_offset, true)];
        for s in &snaps {
            let bytes = s.l1_size as u64 * 8;
            if s.l1_table_offset
                .checked_add(bytes)
                .is_none_or(|e| e > file_len)
            {
                k.error(format!(
                    "ERROR snapshot {} L1 table past the end of the file",
                    s.id
                ));
                continue;
            }
            let mut b = vec![0u8; bytes as usize];
            self.io.read_at(s.l1_table_offset, &mut b).await?;
            let t = b
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            tables.push((t, s.l1_table_offset, false));
        }
        for (t, off, _) in &tables {
            k.inc(*off, t.len() as u64 * 8, 1, "L1 table");
            for (i, &e) in t.iter().enumerate() {
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                if !g.aligned(l2) || e & 0x7f00_0000_0000_01ff != 0 {
                    k.error(format!("ERROR L1 entry {i} is invalid ({e:#x})"));
                    continue;
                }
                if l2 + cs > file_len {
                    k.error(format!(
                        "ERROR L2 table at {l2:#x} is past the end of the file"
                    ));
                    continue;
                }
                k.inc(l2, cs, 1, "L2 table");
                *l2_mult.entry(l2).or_default() += 1;
                l2_guest.entry(l2).or_insert(i as u64 * g.l2_entries);
            }
        }
        let ext = g.extended;
        let mut buf = vec![0u8; cs as usize];
        for (&l2, &mult) in &l2_mult {
            self.io.read_at(l2, &mut buf).await?;
            for i in 0..g.l2_entries as usize {
                let (raw, bm) = layout::l2_entry(&buf, i, ext);
                match L2Entry::decode(&g, raw, bm) {
                    Err(e) => k.error(format!("ERROR L2 table {l2:#x} entry {i}: {e}")),
                    Ok(L2Entry::Normal { host, copied, .. }) if g.data_file => {
                        let guest = (l2_guest.get(&l2).copied().unwrap_or(0) + i as u64) * cs;
                        if (host != 0 || copied) && host != guest {
                            k.error(format!("ERROR L2 table {l2:#x} entry {i}: data file offset {host:#x} is not the guest offset"));
                        }
                    }
                    Ok(L2Entry::Normal { host, .. }) if host != 0 => {
                        k.inc(host, cs, mult, "data cluster")
                    }
                    Ok(L2Entry::Normal { .. }) => {}
                    Ok(L2Entry::Compressed { raw }) => {
                        let (_, _, s, l) = g.compressed_range(raw);
                        k.inc(s, l, mult, "compressed cluster")
                    }
                }
            }
        }
        k.inc(hdr.snapshots_offset, snap_len, 1, "snapshot table");
        k.inc(
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters as u64 * cs,
            1,
            "refcount table",
        );
        let mut bad_blocks = Vec::new();
        for (t, &e) in rt.iter().enumerate() {
            let b = e & OFFSET_MASK;
            if b == 0 {
                continue;
            }
            if !g.aligned(b) || b + cs > file_len {
                k.error(format!(
                    "ERROR refcount block {t} at {b:#x} is invalid or past the end of the file"
                ));
                bad_blocks.push(t);
                continue;
            }
            k.inc(b, cs, 1, "refcount block");
        }
        if let Some((off, len)) = hdr.crypto_header {
            k.inc(off, len, 1, "crypto header");
        }
        if let Some(bm) = hdr.bitmaps {
            self.count_bitmaps(&mut k, bm, file_len).await?;
        }
        // Compare with the refcount blocks.
        let mut computed: BTreeMap<u64, u64> = BTreeMap::new();
        let rpb = g.rc_per_block;
        let order = g.refcount_order;
        for c in 0..nclusters {
            let t = (c / rpb) as usize;
            let mut block = rt.get(t).copied().unwrap_or(0) & OFFSET_MASK;
            let disk = if block == 0 || bad_blocks.contains(&t) {
                0
            } else {
                let idx = (c % rpb) as usize;
                self.with_table(TableKind::Refcount, block, |e| {
                    layout::rc_get(&e.data, order, idx)
                })
                .await?
            };
            let want = k.refs[c as usize] as u64;
            if disk == want {
                continue;
            }
            // From here on the array holds what the file says (for the
            // COPIED checks below), the repaired value once repaired.
            computed.insert(c, want);
            k.refs[c as usize] = disk.min(u32::MAX as u64) as u32;
            let leak = disk > want;
            let fix = match repair {
                Repair::All => true,
                Repair::Leaks => leak,
                Repair::None => false,
            };
            k.report.messages.push(format!(
                "{} cluster {c} refcount={disk} reference={want}",
                if fix {
                    "Repairing"
                } else if leak {
                    "Leaked"
                } else {
                    "ERROR"
                }
            ));
            if leak {
                k.report.leaks += 1;
            } else {
                k.report.corruptions += 1;
            }
            if fix {
                if want > g.rc_max {
                    k.report
                        .messages
                        .push(format!("ERROR cluster {c}: refcount {want} does not fit"));
                    continue;
                }
                if block == 0 || bad_blocks.contains(&t) {
                    // A fresh refcount block for this range, at the end of
                    // the file (past every cluster counted here).
                    if bad_blocks.contains(&t) {
                        self.st().rt[t] = 0;
                        bad_blocks.retain(|&b| b != t);
                    }
                    self.new_refcount_block(t as u64).await?;
                    rt = self.st().rt.clone();
                    block = rt[t] & OFFSET_MASK;
                    rebuilt = true;
                    k.report
                        .messages
                        .push(format!("Rebuilt refcount block {t} at {block:#x}"));
                }
                let idx = (c % rpb) as usize;
                self.with_table(TableKind::Refcount, block, |e| {
                    layout::rc_set(&mut e.data, order, idx, want);
                    let bits = 1usize << order;
                    e.touch(idx * bits / 8, ((idx + 1) * bits).div_ceil(8));
                })
                .await?;
                k.refs[c as usize] = want as u32;
                if leak {
                    k.report.leaks_fixed += 1;
                } else {
                    k.report.corruptions_fixed += 1;
                }
                if want == 0 {
                    let mut st = self.st();
                    st.free_hint = st.free_hint.min(c);
                }
            }
        }
        // COPIED flags of the active tables.
        // Refcounts past the end of the file: nothing can reference those
        // clusters, so any refcount there is a leak (a crash between a refcount
        // write and the write that grows the file leaves them). QEMU's check
        // counts them too, once its allocator has used the space.
        let rt_now = self.st().rt.clone();
        for (t, &e) in rt_now.iter().enumerate() {
            let block = e & OFFSET_MASK;
            let (lo, hi) = (t as u64 * rpb, (t as u64 + 1) * rpb);
            if block == 0 || hi <= nclusters || bad_blocks.contains(&t) {
                continue;
            }
            for c in lo.max(nclusters)..hi {
                let idx = (c % rpb) as usize;
                let disk = self
                    .with_table(TableKind::Refcount, block, |e| {
                        layout::rc_get(&e.data, order, idx)
                    })
                    .await?;
                if disk == 0 {
                    continue;
                }
                k.report.leaks += 1;
                let fix = repair != Repair::None;
                k.report.messages.push(format!(
                    "{} cluster {c} refcount={disk} reference=0",
                    if fix { "Repairing" } else { "Leaked" }
                ));
                if fix {
                    self.with_table(TableKind::Refcount, block, |e| {
                        layout::rc_set(&mut e.data, order, idx, 0);
                        let bits = 1usize << order;
                        e.touch(idx * bits / 8, ((idx + 1) * bits).div_ceil(8));
                    })
                    .await?;
                    k.report.leaks_fixed += 1;
                }
            }
        }
        let refcount_of = |off: u64| k.refs.get((off / cs) as usize).copied().unwrap_or(0);
        let (l1, l1_off) = {
            let st = self.st();
            (st.l1.clone(), st.hdr.l1_table_offset)
        };
        let mut flag_msgs = Vec::new();
        let mut flag_errors = 0u64;
        let mut flag_fixed = 0u64;
        let mut missing = 0u64;
        let references = |off: u64| {
            let c = off / cs;
            computed
                .get(&c)
                .copied()
                .unwrap_or_else(|| k.refs.get(c as usize).copied().unwrap_or(0) as u64)
        };
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 || !g.aligned(l2) || l2 + cs > file_len {
                continue;
            }
            let want_copied = refcount_of(l2) == 1;
            if (e & COPIED != 0) != want_copied {
                flag_errors += 1;
                missing += (want_copied || references(l2) == 1) as u64;
                flag_msgs.push(format!(
                    "ERROR OFLAG_COPIED L2 table: l1_index={i} l1_entry={e:#x} refcount={}",
                    refcount_of(l2)
                ));
                if repair == Repair::All {
                    let ne = if want_copied { e | COPIED } else { e & !COPIED };
                    self.st().l1[i] = ne;
                    self.io
                        .write_at(l1_off + i as u64 * 8, &ne.to_be_bytes())
                        .await?;
                    flag_fixed += 1;
                }
            }
            let refs = &k.refs;
            let (errs, fixed, msgs, miss) = self
                .with_table(TableKind::L2, l2, |t| {
                    let mut errs = 0;
                    let mut miss = 0u64;
                    let mut msgs = Vec::new();
                    let mut changed = false;
                    for j in 0..g.l2_entries as usize {
                        let ri = if ext { 2 * j } else { j };
                        let raw = layout::get_u64(&t.data, ri);
                        if raw & layout::COMPRESSED != 0 {
                            continue;
                        }
                        let host = raw & OFFSET_MASK;
                        if host == 0 || !g.aligned(host) || g.data_file {
                            continue;
                        }
                        let rc = refs.get((host / cs) as usize).copied().unwrap_or(0);
                        let want = rc == 1;
                        if (raw & COPIED != 0) != want {
                            errs += 1;
                            miss += (want || references(host) == 1) as u64;
                            msgs.push(format!(
                                "ERROR OFLAG_COPIED data cluster: l2_entry={raw:#x} refcount={rc}"
                            ));
                            if repair == Repair::All {
                                layout::put_u64(
                                    &mut t.data,
                                    ri,
                                    if want { raw | COPIED } else { raw & !COPIED },
                                );
                                changed = true;
                            }
                        }
                    }
                    if changed {
                        t.dirty = true;
                        t.gen += 1;
                    }
                    (errs, if changed { errs } else { 0 }, msgs, miss)
                })
                .await?;
            flag_errors += errs;
            flag_fixed += fixed;
            missing += miss;
            flag_msgs.extend(msgs);
        }
        k.report.corruptions += flag_errors;
        k.report.harmless_flag_errors = missing;
        k.report.corruptions_fixed += flag_fixed;
        k.report.messages.extend(flag_msgs);
        if writable {
            self.flush_locked().await?;
        }
        Ok((k.report, rebuilt))
    }

    /// Counts the bitmap directory, tables and data clusters (QEMU's
    /// `qcow2_check_bitmaps_refcounts`): a directory that does not parse, or
    /// an invalid table entry, is a corruption.
    async fn count_bitmaps(
        &self,
        k: &mut Counter,
        bm: crate::header::BitmapsExt,
        file_len: u64,
    ) -> Result<()> {
        let cs = self.g.cluster_size;
        k.inc(
            bm.directory_offset,
            bm.directory_size,
            1,
            "bitmap directory",
        );
        let size = self.st().hdr.size;
        let entries = match Self::read_bitmap_directory(&self.io, &bm, cs, size, file_len).await {
            Ok(e) => e,
            Err(Error::Io(e)) => return Err(e.into()),
            Err(e) => {
                k.error(format!("ERROR {e}"));
                return Ok(());
            }
        };
        for e in entries {
            // Inside the file (the directory parser checks it).
            let bytes = e.table_size as u64 * 8;
            k.inc(e.table_offset, bytes, 1, "bitmap table");
            let mut t = vec![0u8; bytes as usize];
            self.io.read_at(e.table_offset, &mut t).await?;
            for i in 0..e.table_size as usize {
                let raw = layout::get_u64(&t, i);
                if let Some(why) = crate::bitmaps::table_entry_problem(raw, cs) {
                    k.error(format!(
                        "ERROR bitmap '{}' table entry {i} ({raw:#x}): {why}",
                        e.name
                    ));
                    continue;
                }
                let off = raw & OFFSET_MASK & !0x1ff;
                if off != 0 {
                    k.inc(off, cs, 1, "bitmap data cluster");
                }
            }
        }
        Ok(())
    }
}
