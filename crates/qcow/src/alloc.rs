//! Refcounts and host cluster allocation, and the ordered writeback of
//! metadata. Callers hold the metadata lock (`Qcow2::meta`).
//!
//! Ordering rules (crash safety):
//! - a refcount increase reaches the file before any L1/L2 entry that uses
//!   the cluster (dirty refcount blocks are written, then the file is
//!   flushed, before dirty L2 tables are written);
//! - a refcount decrease is applied only after the L2/L1 update that removed
//!   the reference has been written and flushed (`pending_frees`); until
//!   then the cluster cannot be reused;
//! - new refcount blocks and tables are written and flushed before the
//!   table entry or header field that points to them.
//!
//! A crash may leak clusters, but never leaves an entry pointing to a
//! cluster whose refcount is zero.
//!
//! Reservations. Without lazy refcounts, the first rule costs a sync for
//! every allocating write: its refcount must be stable before its L2 entry
//! may reach the file, and the entry must reach the file (the host's page
//! cache) before the write completes, so that it survives the daemon being
//! killed while the guest runs on. QEMU keeps the entry in its cache until a
//! flush instead and orders the writeback (refcount blocks, sync, L2 tables),
//! which is one sync per flush, but loses completed writes when its process
//! dies; that is not an option here. So data clusters that grow the image are
//! reserved in batches ([`Qcow2::alloc_data_clusters`]): the refcounts of a run
//! at the end of the file are set to 1, the file is extended over it, and one
//! sync makes both stable; the clusters are then handed out in order with no
//! refcount write and no sync, and every L2 entry that maps one is safe on
//! disk in any order. Batches double from 1 MiB up to 32 MiB (bounded by the
//! virtual size). A crash leaks what was reserved and not handed out. Freed clusters
//! inside the file are reused first, one by one as before: mapping a reused
//! cluster needs a sync for its data anyway. Version 2 images (no dirty bit)
//! and lazy refcounts (no sync to save) do not reserve. Operations that count
//! references (check, snapshots) and a clean close give the unused part back
//! first, through [`Qcow2::flush_locked`].
//!
//! The dirty bit (version 3). A kill between a refcount increase reaching the
//! file and the entry that uses the cluster, or between an entry dropped and
//! its refcount decrease, leaks clusters; so does a reservation. So the dirty
//! bit is set before the first refcount block or L2 entry of a session is
//! written ([`Qcow2::mark_dirty`], in `write_table_as`, `write_l2_entries`,
//! [`Qcow2::prepare_new_references`] and `reserve`), and cleared at a clean
//! close: the next writable open (QEMU's too) rebuilds the refcounts and
//! reclaims every leak a kill leaves, where QEMU's strict refcounts leave
//! single clusters leaked for good.
//!
//! With lazy refcounts (QEMU's `lazy_refcounts`, compat 1.1) the dirty bit is
//! set before the first metadata write, and from then on refcount blocks stay
//! dirty in their cache: guest flushes write L2 tables without writing the
//! refcounts first, so an allocating write plus flush costs one sync instead
//! of two. Refcounts reach the file when the cache overflows, at operations
//! that rewrite structural metadata (snapshots, resize, check) and at close,
//! which then clears the dirty bit. After a crash the refcounts on disk may be
//! stale; the dirty bit makes the next writable open rebuild them. What lazy
//! refcounts keep: L2 tables before the L1 entries that point to them;
//! clusters freed only once the L2 update that dropped them is stable; and
//! guest data stable before an L2 entry maps a host range that may hold older
//! data (a reused cluster, a new subcluster of an old cluster) or content
//! copied on write. New clusters past the old end of the file read as zeroes
//! until written, so mapping them with nothing copied needs no sync first: the
//! common case of a growing image.

use crate::header::{self, incompat};
use crate::image::{Error, Qcow2, Result, TableKind};
use crate::io::{DebugEvent, QcowIo};
use crate::layout::{self, OFFSET_MASK};

/// The first reservation of data clusters (see the module doc), in bytes.
const RESERVE_MIN: u64 = 1 << 20;
/// The largest reservation: what a crash may leak until the next open.
const RESERVE_MAX: u64 = 32 << 20;

/// Clusters allocated for guest data.
#[derive(Debug, Clone)]
pub(crate) struct NewClusters {
    /// Offset of the first.
    pub offset: u64,
    /// Host offsets that read as zeroes until written (never written since
    /// they were past the end of the file).
    pub fresh: std::ops::Range<u64>,
    /// The file already covers the clusters (a reservation extended it).
    pub covered: bool,
}

impl<I: QcowIo> Qcow2<I> {
    /// Refcount of host cluster `c` (index).
    pub(crate) async fn rc_read(&self, c: u64) -> Result<u64> {
        let t = (c / self.g.rc_per_block) as usize;
        let block = {
            let st = self.st();
            st.rt.get(t).copied().unwrap_or(0) & OFFSET_MASK
        };
        if block == 0 {
            return Ok(0);
        }
        self.check_rc_block(t, block).await?;
        let idx = (c % self.g.rc_per_block) as usize;
        let order = self.g.refcount_order;
        self.with_table(TableKind::Refcount, block, |e| {
            layout::rc_get(&e.data, order, idx)
        })
        .await
    }

    async fn check_rc_block(&self, t: usize, block: u64) -> Result<()> {
        let cs = self.g.cluster_size;
        let bad = {
            let st = self.st();
            !self.g.aligned(block) || block >= st.high_water || st.overlaps_fixed(cs, block, cs)
        };
        if bad {
            return Err(self
                .corrupt(format!("refcount table entry {t} is invalid ({block:#x})"))
                .await);
        }
        Ok(())
    }

    /// The events of QEMU's `update_refcount` on a refcount block that exists:
    /// `alloc_refcount_block` raises `RefblockAlloc` whether or not it
    /// allocates, then `RefblockLoad` as it looks the block up (cache hits
    /// too). Lookups that change nothing (the allocator's scan) raise none, as
    /// QEMU's `qcow2_get_refcount`.
    fn refcount_update_events(&self) {
        self.io.debug_event(DebugEvent::RefblockAlloc);
        self.io.debug_event(DebugEvent::RefblockLoad);
    }

    /// Adds `delta` to the refcount of cluster `c`; its block must exist.
    /// Returns the new refcount.
    pub(crate) async fn rc_add(&self, c: u64, delta: i64) -> Result<u64> {
        self.rc_update(c, delta, true).await
    }

    /// [`Self::rc_add`], raising QEMU's events of a refcount update only if
    /// `events` (not for the reservations' own bookkeeping, which QEMU has
    /// not: it updates a refcount when it hands a cluster out).
    async fn rc_update(&self, c: u64, delta: i64, events: bool) -> Result<u64> {
        let t = (c / self.g.rc_per_block) as usize;
        let block = self.st().rt.get(t).copied().unwrap_or(0) & OFFSET_MASK;
        if block == 0 {
            if delta < 0 {
                return Err(self
                    .corrupt(format!(
                        "freeing cluster {:#x} without a refcount block",
                        c * self.g.cluster_size
                    ))
                    .await);
            }
            return Err(Error::NoSpace(format!(
                "internal: no refcount block for cluster {c}"
            )));
        }
        self.check_rc_block(t, block).await?;
        if events {
            self.refcount_update_events();
        }
        let idx = (c % self.g.rc_per_block) as usize;
        let (order, max) = (self.g.refcount_order, self.g.rc_max);
        let r = self
            .with_table(TableKind::Refcount, block, |e| {
                let old = layout::rc_get(&e.data, order, idx);
                let new = if delta >= 0 {
                    old.checked_add(delta as u64).filter(|&v| v <= max)
                } else {
                    old.checked_sub(delta.unsigned_abs())
                };
                if let Some(v) = new {
                    layout::rc_set(&mut e.data, order, idx, v);
                    // Only these bytes need writing (an allocation's refcount
                    // reaches the file at once, before its L2 entry).
                    let bits = 1usize << order;
                    e.touch(idx * bits / 8, ((idx + 1) * bits).div_ceil(8));
                }
                new.ok_or(old)
            })
            .await?;
        match r {
            Ok(v) => {
                if v == 0 {
                    let mut st = self.st();
                    if let Some(freed) = st.freed_clusters.as_mut() {
                        freed.push(c);
                    }
                    st.free_hint = st.free_hint.min(c);
                    let off = c * self.g.cluster_size;
                    st.meta_clusters.remove(&off);
                    if st.free_byte_offset / self.g.cluster_size == c {
                        st.free_byte_offset = 0;
                    }
                    st.l2.remove(off);
                }
                Ok(v)
            }
            Err(old) if delta > 0 && old == max => Err(Error::NoSpace(format!(
                "refcount of cluster {c} would overflow {}-bit refcounts",
                1u32 << order
            ))),
            Err(old) => Err(self
                .corrupt(format!(
                    "refcount of cluster {:#x} is {old}, cannot add {delta}",
                    c * self.g.cluster_size
                ))
                .await),
        }
    }

    /// Allocates `n` contiguous host clusters (refcount 1 each) and returns
    /// the byte offset of the first: the first free run from the free hint,
    /// reusing freed space.
    pub(crate) async fn alloc_clusters(&self, n: u64) -> Result<u64> {
        self.io.debug_event(DebugEvent::ClusterAlloc);
        self.alloc_run(n, true, true).await
    }

    /// Looks for `n` free clusters in a row from the free hint: returns the
    /// first of the run, which may reach past the high-water mark (and starts
    /// there if nothing below is free), and the first free cluster seen.
    async fn scan_free(&self, n: u64) -> Result<(u64, Option<u64>)> {
        let rpb = self.g.rc_per_block;
        let (hint, hw) = {
            let st = self.st();
            (st.free_hint, st.high_water / self.g.cluster_size)
        };
        let mut run_start = hint.max(1);
        let mut run_len = 0u64;
        let mut first_free: Option<u64> = None;
        let mut c = run_start;
        let reserved = self.st().reserved.clone();
        while c < hw && run_len < n {
            if reserved.contains(&c) {
                // In use (refcount 1), and skipped whole.
                if run_len > 0 && first_free.is_none() {
                    first_free = Some(run_start);
                }
                run_len = 0;
                c = reserved.end;
                continue;
            }
            let t = (c / rpb) as usize;
            let has_block = self.st().rt.get(t).is_some_and(|&e| e & OFFSET_MASK != 0);
            if !has_block {
                let to = ((t as u64 + 1) * rpb).min(hw);
                if run_len == 0 {
                    run_start = c;
                }
                run_len += to - c;
                c = to;
                continue;
            }
            if self.rc_read(c).await? == 0 {
                if run_len == 0 {
                    run_start = c;
                }
                run_len += 1;
            } else {
                if run_len > 0 && first_free.is_none() {
                    first_free = Some(run_start);
                }
                run_len = 0;
            }
            c += 1;
        }
        if run_len == 0 {
            run_start = c.max(hw);
        }
        Ok((run_start, first_free))
    }

    /// The last cluster of `from..to` whose refcount is not 0 (reading only
    /// the refcount blocks that exist).
    async fn last_used(&self, from: u64, to: u64) -> Result<Option<u64>> {
        let rpb = self.g.rc_per_block;
        let mut last = None;
        let mut c = from;
        while c < to {
            let t = (c / rpb) as usize;
            if self.st().rt.get(t).is_none_or(|&e| e & OFFSET_MASK == 0) {
                c = (t as u64 + 1) * rpb;
                continue;
            }
            if self.rc_read(c).await? != 0 {
                last = Some(c);
            }
            c += 1;
        }
        Ok(last)
    }

    /// Moves the high-water mark past the clusters of `from..to` (at or past
    /// it) that have a refcount: leaks past the end of the file, which a crash
    /// leaves when refcounts reached the file and the file did not grow (QEMU's
    /// allocator can leave them too). Returns whether it moved.
    async fn skip_leaks(&self, from: u64, to: u64) -> Result<bool> {
        let Some(c) = self.last_used(from, to).await? else {
            return Ok(false);
        };
        let cs = self.g.cluster_size;
        log::debug!(
            "qcow2: cluster {:#x} past the end of the file is leaked",
            c * cs
        );
        let mut st = self.st();
        st.high_water = st.high_water.max((c + 1) * cs);
        Ok(true)
    }

    /// Allocates `n` contiguous host clusters (refcount 1 each): the first free
    /// run from the free hint when `reuse_holes`, else at the high-water mark.
    /// `events`: see [`Self::rc_update`].
    async fn alloc_run(&self, n: u64, reuse_holes: bool, events: bool) -> Result<u64> {
        let rpb = self.g.rc_per_block;
        let cs = self.g.cluster_size;
        'outer: loop {
            let (run_start, first_free) = if reuse_holes {
                self.scan_free(n).await?
            } else {
                (self.st().high_water / cs, None)
            };
            let hw = self.st().high_water / cs;
            // Clusters at and past the high-water mark are free, once they have
            // refcount blocks and unless a crash left refcounts there.
            let first_t = run_start / rpb;
            let last_t = (run_start + n - 1) / rpb;
            for t in first_t..=last_t {
                let (len, entry) = {
                    let st = self.st();
                    (
                        st.rt.len() as u64,
                        st.rt.get(t as usize).copied().unwrap_or(0) & OFFSET_MASK,
                    )
                };
                if t >= len {
                    self.grow_refcount_table(t + 1).await?;
                    continue 'outer;
                }
                if entry == 0 {
                    self.new_refcount_block(t).await?;
                    continue 'outer;
                }
            }
            if run_start + n > hw && self.skip_leaks(run_start.max(hw), run_start + n).await? {
                continue;
            }
            let clash = {
                let st = self.st();
                (run_start..run_start + n).find(|&c| {
                    st.meta_clusters.contains(&(c * cs)) || st.overlaps_fixed(cs, c * cs, cs)
                })
            };
            if let Some(c) = clash {
                return Err(self
                    .corrupt(format!(
                        "cluster {:#x} holds metadata but its refcount is 0",
                        c * cs
                    ))
                    .await);
            }
            for c in run_start..run_start + n {
                let v = self.rc_update(c, 1, events).await?;
                if v != 1 {
                    return Err(self
                        .corrupt(format!(
                            "allocated cluster {:#x} was already in use",
                            c * cs
                        ))
                        .await);
                }
            }
            let mut st = self.st();
            if reuse_holes {
                st.free_hint = first_free.unwrap_or(run_start + n);
            }
            st.high_water = st.high_water.max((run_start + n) * cs);
            return Ok(run_start * cs);
        }
    }

    /// Allocates `n` contiguous clusters for guest data: freed space inside
    /// the file first, else from the reservation (see the module doc).
    pub(crate) async fn alloc_data_clusters(&self, n: u64) -> Result<NewClusters> {
        self.io.debug_event(DebugEvent::ClusterAlloc);
        let cs = self.g.cluster_size;
        let (hw, reserving) = {
            let st = self.st();
            (st.high_water, st.hdr.version >= 3)
        };
        if !reserving {
            // Every commit syncs for the refcounts, which covers the growth
            // of the file too.
            return Ok(NewClusters {
                offset: self.alloc_clusters(n).await?,
                fresh: hw..u64::MAX,
                covered: false,
            });
        }
        let (start, first_free) = self.scan_free(n).await?;
        if start < hw / cs {
            // Reused clusters (and any past the end that the run reaches)
            // are mapped only once their data is stable.
            return Ok(NewClusters {
                offset: self.alloc_clusters(n).await?,
                fresh: 0..0,
                covered: false,
            });
        }
        {
            // Nothing below is free but from `first_free` on: later scans
            // start there (and skip the reservation).
            let mut st = self.st();
            st.free_hint = st.free_hint.max(first_free.unwrap_or(hw / cs));
        }
        let c = match self.take_reserved(n) {
            Some(c) => c,
            None => {
                self.reserve(n).await?;
                self.take_reserved(n)
                    .ok_or_else(|| Error::NoSpace("internal: reservation too small".into()))?
            }
        };
        // QEMU counts these clusters in its cached refcount block now and writes
        // it back at the next flush: that write-back raises the event.
        self.refcount_update_events();
        self.st().rc_event_owed = true;
        Ok(NewClusters {
            offset: c * cs,
            fresh: c * cs..(c + n) * cs,
            covered: true,
        })
    }

    /// Hands out the first `n` reserved clusters, if there are that many.
    fn take_reserved(&self, n: u64) -> Option<u64> {
        let mut st = self.st();
        let r = &mut st.reserved;
        (r.end - r.start >= n).then(|| {
            r.start += n;
            r.start - n
        })
    }

    /// Reserves a batch of at least `n` clusters at the end of the file,
    /// continuing the current reservation if it ends there (else giving back
    /// what is left of it): refcounts set, the file extended over it, the
    /// dirty bit set, all stable after one sync.
    async fn reserve(&self, n: u64) -> Result<()> {
        let cs = self.g.cluster_size;
        let (count, old) = {
            let mut st = self.st();
            let most = (RESERVE_MAX / cs).max(1);
            let batch = st.reserve_next.clamp((RESERVE_MIN / cs).max(1), most);
            st.reserve_next = (batch * 2).min(most);
            let disk = st.hdr.size.div_ceil(cs);
            (n.max(batch.min(disk)), st.reserved.clone())
        };
        let start = self.alloc_run(count, false, false).await? / cs;
        let end = start + count;
        let keep = old.end == start && !old.is_empty();
        self.st().reserved = if keep { old.start..end } else { start..end };
        if !keep {
            for c in old {
                // Never referenced: free at once.
                self.rc_update(c, -1, false).await?;
            }
        }
        // The file covers the clusters before their refcounts can be stable,
        // so that after a power loss no entry maps a cluster past its end.
        if self.io.len().await? < end * cs {
            self.io.set_len(end * cs).await?;
        }
        // The sync below makes the dirty bit stable with the refcounts.
        self.mark_dirty_as(false).await?;
        if !self.refcounts_lazy() {
            // QEMU's refcount updates stay in its cache: the event is owed.
            self.write_dirty_refcounts_as(false).await?;
        }
        self.sync_unchecked().await
    }

    /// Gives the reserved clusters not handed out back (they were never
    /// referenced). When they end the file, the high-water mark goes back, and
    /// the flush cuts the file there once their refcounts are stable.
    pub(crate) async fn release_reservation(&self) -> Result<()> {
        let (r, hw) = {
            let mut st = self.st();
            (std::mem::replace(&mut st.reserved, 0..0), st.high_water)
        };
        if r.is_empty() {
            return Ok(());
        }
        for c in r.clone() {
            self.rc_update(c, -1, false).await?;
        }
        let cs = self.g.cluster_size;
        if r.end * cs == hw {
            self.st().high_water = r.start * cs;
        }
        Ok(())
    }

    /// Makes every completed write stable. Refcount writes set `rc_unsynced`
    /// (after they complete); a sync clears it (before it starts), so that
    /// an entry whose refcount is stable already is written without one.
    pub(crate) async fn sync(&self) -> Result<()> {
        self.sync_as(true).await
    }

    /// [`Self::sync`] where QEMU's qcow2 does not flush (the syncs of an
    /// allocating write): through [`QcowIo::flush_unchecked`].
    pub(crate) async fn sync_unchecked(&self) -> Result<()> {
        self.sync_as(false).await
    }

    async fn sync_as(&self, checked: bool) -> Result<()> {
        // Only ever set to true elsewhere: reading it first takes the changing lock
        // (a new generation) only when there is something to take.
        let was = self.st_read().rc_unsynced && std::mem::take(&mut self.st().rc_unsynced);
        let r = if checked {
            self.io.flush().await
        } else {
            self.io.flush_unchecked().await
        };
        if let Err(e) = r {
            self.st().rc_unsynced |= was;
            return Err(e.into());
        }
        Ok(())
    }

    /// Allocates `len` (< cluster size) bytes for compressed data, packing
    /// several compressed clusters into one host cluster as QEMU does: each
    /// host cluster's refcount counts the compressed clusters touching it.
    pub(crate) async fn alloc_bytes(&self, len: u64) -> Result<u64> {
        self.io.debug_event(DebugEvent::ClusterAllocBytes);
        let cs = self.g.cluster_size;
        let fbo = self.st().free_byte_offset;
        // Sharing a host cluster needs a refcount increment, which narrow
        // refcounts may not allow: then start a new cluster.
        let share = |r: Result<u64>| match r {
            Ok(_) => Ok(true),
            Err(Error::NoSpace(_)) => Ok(false),
            Err(e) => Err(e),
        };
        if fbo != 0 && fbo % cs + len <= cs && share(self.rc_add(fbo / cs, 1).await)? {
            self.st().free_byte_offset = if (fbo + len).is_multiple_of(cs) {
                0
            } else {
                fbo + len
            };
            return Ok(fbo);
        }
        let new = self.alloc_clusters(1).await?;
        let off = if fbo != 0
            && new == self.g.cluster_start(fbo) + cs
            && fbo % cs + len > cs
            && share(self.rc_add(fbo / cs, 1).await)?
        {
            // Continue from the partly used cluster into the next one.
            fbo
        } else {
            new
        };
        self.st().free_byte_offset = if (off + len).is_multiple_of(cs) {
            0
        } else {
            off + len
        };
        Ok(off)
    }

    /// Creates the refcount block for table index `t`, placed at the end of
    /// the file.
    pub(crate) async fn new_refcount_block(&self, t: u64) -> Result<()> {
        self.io.debug_event(DebugEvent::RefblockAlloc);
        let rpb = self.g.rc_per_block;
        let cs = self.g.cluster_size;
        loop {
            let (pos, len, t2_entry) = {
                let st = self.st();
                let pos = st.high_water / cs;
                (
                    pos,
                    st.rt.len() as u64,
                    st.rt.get((pos / rpb) as usize).copied().unwrap_or(0) & OFFSET_MASK,
                )
            };
            let t2 = pos / rpb;
            if t2 >= len {
                self.grow_refcount_table(t2 + 1).await?;
                continue;
            }
            let mut block = vec![0u8; cs as usize];
            if t2 == t || t2_entry == 0 {
                // Self-describing: the block counts its own cluster.
                layout::rc_set(&mut block, self.g.refcount_order, (pos % rpb) as usize, 1);
                self.install_refcount_block(t2, pos * cs, block).await?;
                if t2 == t {
                    return Ok(());
                }
                continue;
            }
            if self.skip_leaks(pos, pos + 1).await? {
                continue;
            }
            self.st().high_water = (pos + 1) * cs;
            if self.rc_add(pos, 1).await? != 1 {
                return Err(self
                    .corrupt(format!("cluster {:#x} past the end was in use", pos * cs))
                    .await);
            }
            self.write_dirty_refcounts().await?;
            self.install_refcount_block(t, pos * cs, block).await?;
            return Ok(());
        }
    }

    async fn install_refcount_block(&self, t: u64, off: u64, block: Vec<u8>) -> Result<()> {
        let cs = self.g.cluster_size;
        {
            let mut st = self.st();
            st.high_water = st.high_water.max(off + cs);
        }
        self.io.debug_event(DebugEvent::RefblockAllocWrite);
        self.io.write_at(off, &block).await?;
        self.sync().await?;
        let rt_off = {
            let mut st = self.st();
            st.rt[t as usize] = off;
            st.meta_clusters.insert(off);
            st.rc.insert(off, block, false);
            st.hdr.refcount_table_offset
        };
        self.io.debug_event(DebugEvent::RefblockAllocHookup);
        self.io.write_at(rt_off + t * 8, &off.to_be_bytes()).await?;
        self.st().rc_unsynced = true;
        Ok(())
    }

    /// Replaces the refcount table by a larger one with at least
    /// `min_entries` entries, written at the end of the file together with
    /// the refcount blocks that describe it.
    async fn grow_refcount_table(&self, min_entries: u64) -> Result<()> {
        self.io.debug_event(DebugEvent::ReftableGrow);
        let cs = self.g.cluster_size;
        let rpb = self.g.rc_per_block;
        let epc = cs / 8;
        let (old, p, old_off, old_clusters, k, m, ranges) = loop {
            let (old, p, old_off, old_clusters) = {
                let st = self.st();
                (
                    st.rt.clone(),
                    st.high_water / cs,
                    st.hdr.refcount_table_offset,
                    st.hdr.refcount_table_clusters as u64,
                )
            };
            let lacking = |t: u64| old.get(t as usize).is_none_or(|&e| e & OFFSET_MASK == 0);
            let want = min_entries.max(old.len() as u64 + old.len() as u64 / 2);
            let mut k = want.div_ceil(epc);
            let (m, ranges) = loop {
                let mut m = 0u64;
                let ranges = loop {
                    let r: Vec<u64> = (p / rpb..=(p + k + m - 1) / rpb)
                        .filter(|&t| lacking(t))
                        .collect();
                    if r.len() as u64 == m {
                        break r;
                    }
                    m = r.len() as u64;
                };
                let cap = k * epc;
                if (p + k + m - 1) / rpb < cap && min_entries <= cap {
                    break (m, ranges);
                }
                k += 1;
            };
            if !self.skip_leaks(p, p + k + m).await? {
                break (old, p, old_off, old_clusters, k, m, ranges);
            }
        };
        if k * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace(
                "refcount table would exceed its maximum size".into(),
            ));
        }
        let mut table = vec![0u8; (k * cs) as usize];
        for (i, &e) in old.iter().enumerate() {
            layout::put_u64(&mut table, i, e);
        }
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for (i, &t) in ranges.iter().enumerate() {
            let off = (p + k + i as u64) * cs;
            layout::put_u64(&mut table, t as usize, off);
            blocks.push((t, vec![0u8; cs as usize]));
        }
        self.st().high_water = (p + k + m) * cs;
        for c in p..p + k + m {
            let t = c / rpb;
            if let Some((_, b)) = blocks.iter_mut().find(|(bt, _)| *bt == t) {
                layout::rc_set(b, self.g.refcount_order, (c % rpb) as usize, 1);
            } else if self.rc_add(c, 1).await? != 1 {
                return Err(self
                    .corrupt(format!("cluster {:#x} past the end was in use", c * cs))
                    .await);
            }
        }
        self.io.debug_event(DebugEvent::RefblockAllocWriteBlocks);
        for (i, (_, b)) in blocks.iter().enumerate() {
            self.io.write_at((p + k + i as u64) * cs, b).await?;
        }
        self.io.debug_event(DebugEvent::RefblockAllocWriteTable);
        self.io.write_at(p * cs, &table).await?;
        self.st().rc_unsynced = true;
        self.write_dirty_refcounts().await?;
        self.sync().await?;
        {
            let mut st = self.st();
            st.hdr.refcount_table_offset = p * cs;
            st.hdr.refcount_table_clusters = k as u32;
            st.rt = table
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            for (i, (_, b)) in blocks.into_iter().enumerate() {
                st.meta_clusters.insert((p + k + i as u64) * cs);
                st.rc.insert((p + k + i as u64) * cs, b, false);
            }
        }
        self.io.debug_event(DebugEvent::RefblockAllocSwitchTable);
        self.write_header().await?;
        self.sync().await?;
        self.io.debug_event(DebugEvent::ClusterFree);
        for c in old_off / cs..old_off / cs + old_clusters {
            self.rc_add(c, -1).await?;
        }
        Ok(())
    }

    /// Writes one dirty cached table back, raising its event
    /// (`L2Update`, `RefblockUpdatePart`) first.
    pub(crate) async fn write_table(&self, kind: TableKind, off: u64) -> Result<()> {
        self.write_table_as(kind, off, true).await
    }

    /// [`Self::write_table`], raising the event only if `raise`.
    async fn write_table_as(&self, kind: TableKind, off: u64, raise: bool) -> Result<()> {
        if self.st().cache(kind).get(off).is_none_or(|e| !e.dirty) {
            return Ok(());
        }
        // A kill may leave a refcount increase in the file without the entry
        // that uses the cluster, or an entry dropped before its refcount
        // decrease: leaks, which the dirty bit has the next open reclaim.
        self.mark_dirty().await?;
        let (at, data, gen) = {
            let mut st = self.st();
            match st.cache(kind).get(off) {
                // Refcount blocks record what changed: write only that.
                Some(e) if e.dirty => match e.dirty_bytes.filter(|_| kind == TableKind::Refcount) {
                    Some((a, b)) => (a as u64, e.data[a..b].to_vec(), e.gen),
                    None => (0, e.data.clone(), e.gen),
                },
                _ => return Ok(()),
            }
        };
        if raise {
            self.io.debug_event(match kind {
                TableKind::L2 => DebugEvent::L2Update,
                TableKind::Refcount => DebugEvent::RefblockUpdatePart,
            });
        }
        self.io.write_at(off + at, &data).await?;
        let mut st = self.st();
        if kind == TableKind::Refcount {
            st.rc_unsynced = true;
        }
        if let Some(e) = st.cache(kind).get(off) {
            if e.gen == gen {
                e.dirty = false;
                e.dirty_bytes = None;
            }
        }
        st.epoch += 1;
        Ok(())
    }

    /// Writes every dirty refcount block (always safe: see the module doc),
    /// raising `RefblockUpdatePart` where QEMU writes its cached refcount
    /// blocks back: before each block, or once if nothing is dirty but
    /// reserved clusters were handed out since the last time (their refcounts
    /// were written with the reservation; QEMU's are still dirty).
    pub(crate) async fn write_dirty_refcounts(&self) -> Result<()> {
        self.write_dirty_refcounts_as(true).await
    }

    /// [`Self::write_dirty_refcounts`], raising no event unless `raise` (the
    /// event is then owed to the next write-back that raises).
    async fn write_dirty_refcounts_as(&self, raise: bool) -> Result<()> {
        let (dirty, owed) = {
            let st = self.st_read();
            (st.rc.dirty(), raise && st.rc_event_owed)
        };
        // Only ever set to true elsewhere, so clearing it now is taking it.
        let owed = owed && std::mem::take(&mut self.st().rc_event_owed);
        if dirty.is_empty() && owed {
            self.io.debug_event(DebugEvent::RefblockUpdatePart);
        }
        if !raise && !dirty.is_empty() {
            self.st().rc_event_owed = true;
        }
        for off in dirty {
            self.write_table_as(TableKind::Refcount, off, raise).await?;
        }
        Ok(())
    }

    /// Whether lazy refcounts are in effect: the dirty bit is set and refcounts
    /// on disk need not be accurate.
    pub(crate) fn refcounts_lazy(&self) -> bool {
        let st = self.st_read();
        st.lazy && st.dirty_marked
    }

    /// Before an entry that points to newly allocated clusters is written: the
    /// dirty bit with lazy refcounts, else the refcounts. The caller flushes.
    pub(crate) async fn prepare_new_references(&self) -> Result<()> {
        self.mark_dirty().await?;
        if !self.refcounts_lazy() {
            self.write_dirty_refcounts().await?;
        }
        Ok(())
    }

    /// [`Self::prepare_new_references`] for a guest write's own entries, where
    /// QEMU leaves its refcount blocks dirty in its cache until the next flush:
    /// the refcounts written here raise their event at that flush instead.
    pub(crate) async fn prepare_new_references_of_write(&self) -> Result<()> {
        self.mark_dirty().await?;
        if !self.refcounts_lazy() {
            self.write_dirty_refcounts_as(false).await?;
        }
        Ok(())
    }

    /// After [`Self::prepare_new_references`]: whether entries that reference
    /// clusters must wait for a sync, as refcounts written since the last one
    /// may count them (with lazy refcounts, the dirty bit covers them).
    pub(crate) fn new_references_need_sync(&self) -> bool {
        !self.refcounts_lazy() && self.st_read().rc_unsynced
    }

    /// Writes every dirty L2 table, after the refcounts (unless lazy) and the
    /// guest data they depend on: one sync first, skipped when the new entries
    /// only map clusters past the old end of the file and no refcount write
    /// waits for a sync (lazy refcounts, or reserved clusters).
    pub(crate) async fn write_dirty_l2(&self) -> Result<()> {
        let (dirty, data_sync) = {
            let st = self.st_read();
            (st.l2.dirty(), st.l2_needs_data_sync)
        };
        if dirty.is_empty() {
            return Ok(());
        }
        self.prepare_new_references().await?;
        if data_sync || self.new_references_need_sync() {
            self.sync().await?;
            // Commits that set the flag since were made after their data was
            // written, so this sync covers them too.
            self.st().l2_needs_data_sync = false;
        }
        for off in dirty {
            self.write_table(TableKind::L2, off).await?;
        }
        Ok(())
    }

    /// Sets the dirty bit of a version 3 image, if not set yet: before the
    /// session's first metadata write that a kill could leave as a leak (see
    /// the module doc). With lazy refcounts the bit is made stable at once, as
    /// refcounts on disk may be stale from then on; else the next sync makes it
    /// stable (a kill keeps it anyway, and a power loss only risks a leak).
    pub(crate) async fn mark_dirty(&self) -> Result<()> {
        let lazy = self.st().lazy;
        self.mark_dirty_as(lazy).await
    }

    /// [`Self::mark_dirty`], syncing only if `sync`. Only the feature bits are
    /// written: other header fields may be changing in memory.
    async fn mark_dirty_as(&self, sync: bool) -> Result<()> {
        let features = {
            let mut st = self.st();
            if st.dirty_marked || st.hdr.version < 3 || !st.writable || st.corrupt {
                return Ok(());
            }
            st.hdr.incompatible_features |= incompat::DIRTY;
            st.dirty_marked = true;
            st.hdr.incompatible_features
        };
        self.io
            .write_at(
                header::INCOMPATIBLE_FEATURES_OFFSET,
                &features.to_be_bytes(),
            )
            .await?;
        if sync {
            self.sync().await?;
        }
        Ok(())
    }

    /// Applies the refcount decreases of clusters whose references are gone
    /// from the (already written and flushed) L2/L1 tables.
    async fn apply_pending_frees(&self) -> Result<()> {
        let (frees, punch_other) = {
            let mut st = self.st();
            (std::mem::take(&mut st.pending_frees), st.pass_discard_other)
        };
        let cs = self.g.cluster_size;
        let mut freed = Vec::new();
        for (off, len, other) in frees {
            self.io.debug_event(DebugEvent::ClusterFree);
            let first = off / cs;
            let last = (off + len - 1) / cs;
            for c in first..=last {
                if self.rc_add(c, -1).await? == 0 && other && punch_other {
                    freed.push(c);
                }
            }
        }
        self.punch_clusters(freed).await;
        Ok(())
    }

    /// Gives the host back the space of clusters whose refcount just reached 0
    /// (`pass-discard-*`). Called with the metadata lock held, so that no
    /// allocation can take them first; nothing references them any more, so
    /// their content does not matter even after a crash. Advisory: errors are
    /// ignored.
    pub(crate) async fn punch_clusters(&self, mut clusters: Vec<u64>) {
        clusters.sort_unstable();
        clusters.dedup();
        let cs = self.g.cluster_size;
        let mut i = 0;
        while i < clusters.len() {
            let mut j = i + 1;
            while j < clusters.len() && clusters[j] == clusters[j - 1] + 1 {
                j += 1;
            }
            let (off, len) = (clusters[i] * cs, (j - i) as u64 * cs);
            if let Err(e) = self.io.discard(off, len).await {
                log::debug!("qcow2: discarding freed clusters {off:#x}+{len:#x}: {e}");
            }
            i = j;
        }
    }

    /// Flush with the metadata lock held: writes all metadata back in
    /// dependency order (refcounts too, even when lazy), applies pending
    /// frees, flushes the file.
    pub(crate) async fn flush_locked(&self) -> Result<()> {
        self.flush_metadata(true).await
    }

    /// A guest flush with the metadata lock held: like [`Self::flush_locked`],
    /// except that with lazy refcounts in effect the refcount blocks stay
    /// dirty in the cache.
    pub(crate) async fn flush_guest_locked(&self) -> Result<()> {
        self.flush_metadata(false).await
    }

    async fn flush_metadata(&self, all: bool) -> Result<()> {
        let writable = {
            let st = self.st_read();
            st.writable && !st.corrupt
        };
        if writable {
            if all {
                self.release_reservation().await?;
            }
            self.write_dirty_l2().await?;
            let refcounts = all || !self.refcounts_lazy();
            if refcounts {
                self.write_dirty_refcounts().await?;
            }
            self.sync().await?;
            if !self.st_read().pending_frees.is_empty() {
                // The L2 updates that dropped these references are stable now.
                self.apply_pending_frees().await?;
                if refcounts {
                    self.write_dirty_refcounts().await?;
                }
            }
            // The file covers every cluster in use, and no more than that
            // after a reservation was given back.
            let hw = self.st_read().high_water;
            if self.io.len().await? != hw {
                self.io.set_len(hw).await?;
            }
            let over = {
                let st = self.st_read();
                st.l2.over_capacity() || st.rc.over_capacity()
            };
            if over {
                let mut st = self.st();
                let (l2, rc) = (st.l2.capacity(), st.rc.capacity());
                st.l2.evict_clean(l2);
                st.rc.evict_clean(rc);
            }
        }
        self.sync().await?;
        Ok(())
    }

    /// Keeps the caches within their capacity, writing back when needed.
    pub(crate) async fn trim_caches(&self) -> Result<()> {
        let (l2_over, rc_over, frees) = {
            let st = self.st_read();
            (
                st.l2.over_capacity(),
                st.rc.over_capacity(),
                st.pending_frees.len(),
            )
        };
        if l2_over || frees > 4096 {
            return self.flush_guest_locked().await;
        }
        if rc_over {
            self.write_dirty_refcounts().await?;
            let mut st = self.st();
            let cap = st.rc.capacity();
            st.rc.evict_clean(cap);
        }
        Ok(())
    }

    /// Ensures the L2 table for L1 index `i` exists and is not shared;
    /// returns its offset.
    pub(crate) async fn ensure_l2(&self, i: u64) -> Result<u64> {
        let l1e = self.st().l1.get(i as usize).copied();
        let Some(l1e) = l1e else {
            return Err(Error::OutOfRange {
                offset: i * self.g.l2_span(),
                len: 0,
                size: self.size(),
            });
        };
        let old = l1e & OFFSET_MASK;
        if old != 0 {
            self.check_l2_offset(i, l1e).await?;
            if l1e & layout::COPIED != 0 {
                return Ok(old);
            }
        }
        let cs = self.g.cluster_size;
        let content = if old == 0 {
            vec![0u8; cs as usize]
        } else {
            self.io.debug_event(DebugEvent::L2AllocCowRead);
            self.read_table(TableKind::L2, old, |e| e.data.clone())
                .await?
        };
        let new = self.alloc_clusters(1).await?;
        self.io.debug_event(DebugEvent::L2AllocWrite);
        // QEMU writes the new table by flushing its L2 cache, whose write-back
        // raises l2_update.
        self.io.debug_event(DebugEvent::L2Update);
        self.io.write_at(new, &content).await?;
        self.prepare_new_references().await?;
        self.sync().await?;
        let l1_off = {
            let mut st = self.st();
            st.l1[i as usize] = new | layout::COPIED;
            st.meta_clusters.insert(new);
            st.l2.insert(new, content, false);
            st.hdr.l1_table_offset
        };
        self.io.debug_event(DebugEvent::L1Update);
        self.io
            .write_at(l1_off + i * 8, &(new | layout::COPIED).to_be_bytes())
            .await?;
        if old != 0 {
            self.st().pending_frees.push((old, cs, true));
        }
        Ok(new)
    }
}
