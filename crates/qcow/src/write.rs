//! The write path: allocation with copy-on-write, commit, zero writes,
//! discard, flush, resize and close.

use crate::alloc::NewClusters;
use crate::image::{Error, Qcow2, RangeLock, Result, TableKind};
use crate::io::{DebugEvent, QcowIo};
use crate::layout::{self, low_bits, L2Entry, COPIED, OFFSET_MASK};
use crate::Backing;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

/// A host range to write guest data to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// Guest offset of the first byte.
    pub guest_offset: u64,
    /// Host offset in the image file.
    pub host_offset: u64,
    /// Length in bytes.
    pub len: u64,
}

#[derive(Debug, Clone)]
enum CowSource {
    Zero,
    Backing,
    Host(u64),
    Buffer(Arc<Vec<u8>>, usize),
}

#[derive(Debug, Clone)]
struct Cow {
    guest: u64,
    dest: u64,
    len: u64,
    src: CowSource,
}

#[derive(Debug, Clone, Copy)]
struct Update {
    cluster: u64,
    raw: u64,
    bitmap: u64,
}

/// Holds a range of guest clusters locked; released on drop.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a, I: QcowIo> {
    img: &'a Qcow2<I>,
    id: u64,
}

impl<I: QcowIo> Drop for RangeGuard<'_, I> {
    fn drop(&mut self) {
        self.img.st().locks.retain(|l| l.id != self.id);
        self.img.waits.wake_all();
    }
}

/// Host clusters reserved for a guest write. Write the guest data to
/// [`Allocation::ranges`], then call [`Qcow2::commit`]. Dropping it without
/// commit releases the guest range and leaks the reserved clusters (use
/// [`Qcow2::abort`] to free them).
#[derive(Debug)]
pub struct Allocation<'a, I: QcowIo> {
    guard: Option<RangeGuard<'a, I>>,
    /// Guest offset of the write.
    pub offset: u64,
    /// Length of the write.
    pub len: u64,
    ranges: Vec<HostRange>,
    updates: Vec<Update>,
    frees: Vec<(u64, u64)>,
    reserved: Vec<(u64, u64)>,
    /// Whether the data must be stable before the L2 table is written: when
    /// the new entries map host ranges that may hold older data (reused
    /// clusters, newly allocated subclusters, an external data file), or
    /// copy-on-write copied old content (which a crash must not lose).
    needs_data_sync: bool,
}

impl<I: QcowIo> Allocation<'_, I> {
    /// Where the guest data goes, in guest order, covering the whole write.
    pub fn ranges(&self) -> &[HostRange] {
        &self.ranges
    }
    /// Whether commit has metadata to update (false for in-place writes).
    pub fn needs_commit(&self) -> bool {
        !self.updates.is_empty()
    }
}

impl<I: QcowIo> Qcow2<I> {
    fn check_writable(&self) -> Result<()> {
        let st = self.st();
        if st.corrupt {
            return Err(Error::Corrupt("image is marked corrupt".into()));
        }
        if !st.writable {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    pub(crate) fn check_writable_pub(&self) -> Result<()> {
        self.check_writable()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    fn conflicts(locks: &[RangeLock], start: u64, end: u64, shared: bool) -> bool {
        locks
            .iter()
            .any(|l| l.start < end && start < l.end && !(shared && l.shared))
    }

    /// Locks guest clusters `[start, end)`, waiting for conflicting holders.
    pub(crate) async fn lock_range(&self, start: u64, end: u64, shared: bool) -> RangeGuard<'_, I> {
        let id = poll_fn(|cx| {
            let mut st = self.st();
            if Self::conflicts(&st.locks, start, end, shared) {
                self.waits.register(cx.waker());
                return Poll::Pending;
            }
            let id = st.next_lock_id;
            st.next_lock_id += 1;
            st.locks.push(RangeLock {
                start,
                end,
                shared,
                id,
            });
            Poll::Ready(id)
        })
        .await;
        RangeGuard { img: self, id }
    }

    /// Fast path: every cluster already allocated, unshared and (with
    /// subclusters) allocated where written, all in one L2 table that is
    /// cached. Takes a shared lock.
    fn try_in_place(&self, offset: u64, len: u64) -> Option<Allocation<'_, I>> {
        let g = self.g;
        let cs = g.cluster_size;
        let end = offset + len;
        let span = g.l2_span();
        if offset / span != (end - 1) / span {
            return None;
        }
        let c0 = offset / cs;
        let c1 = (end - 1) / cs + 1;
        let mut st = self.st();
        let l1e = *st.l1.get((offset / span) as usize)?;
        if l1e & COPIED == 0 || l1e & OFFSET_MASK == 0 {
            return None;
        }
        let hw = st.high_water;
        if Self::conflicts(&st.locks, c0, c1, true) {
            return None;
        }
        let mut ranges: Vec<HostRange> = Vec::new();
        {
            let e = st.l2.get(l1e & OFFSET_MASK)?;
            for c in c0..c1 {
                let i = (c % g.l2_entries) as usize;
                let (raw, bm) = layout::l2_entry(&e.data, i, g.extended);
                let Ok(L2Entry::Normal {
                    host,
                    copied: true,
                    alloc,
                    ..
                }) = L2Entry::decode(&g, raw, bm)
                else {
                    return None;
                };
                if !g.data_file && (host == 0 || host >= hw) {
                    return None;
                }
                let a = offset.max(c * cs) - c * cs;
                let b = end.min((c + 1) * cs) - c * cs;
                let s0 = (a / g.subcluster_size) as u32;
                let s1 = ((b - 1) / g.subcluster_size) as u32;
                let need = low_bits(s1 + 1) & !low_bits(s0);
                if alloc & need != need {
                    return None;
                }
                let r = HostRange {
                    guest_offset: c * cs + a,
                    host_offset: host + a,
                    len: b - a,
                };
                match ranges.last_mut() {
                    Some(l) if l.host_offset + l.len == r.host_offset => l.len += r.len,
                    _ => ranges.push(r),
                }
            }
        }
        if !g.data_file && st.overlaps_fixed(cs, ranges[0].host_offset, 1) {
            return None;
        }
        let id = st.next_lock_id;
        st.next_lock_id += 1;
        st.locks.push(RangeLock {
            start: c0,
            end: c1,
            shared: true,
            id,
        });
        drop(st);
        Some(Allocation {
            guard: Some(RangeGuard { img: self, id }),
            offset,
            len,
            ranges,
            updates: Vec::new(),
            frees: Vec::new(),
            reserved: Vec::new(),
            needs_data_sync: false,
        })
    }

    /// Prepares a guest write of `len` bytes at `offset`: reserves host
    /// clusters where needed (refcounts first), fills the copy-on-write parts
    /// of partially written clusters (from the old cluster, zeroes, or
    /// `backing`), and returns where to write the guest data. Overlapping
    /// allocations wait for each other; others proceed concurrently.
    pub async fn allocate<B: Backing>(
        &self,
        offset: u64,
        len: u64,
        backing: &B,
    ) -> Result<Allocation<'_, I>> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(Error::Unaligned {
                offset,
                len,
                align: 1,
            });
        }
        let encrypted = self.data_cipher()?.is_some();
        self.check_sectors(offset, len)?;
        if let Some(a) = self.try_in_place(offset, len) {
            return Ok(a);
        }
        let g = self.g;
        let cs = g.cluster_size;
        let end = offset + len;
        let c0 = offset / cs;
        let c1 = (end - 1) / cs + 1;
        let guard = self.lock_range(c0, c1, false).await;
        let meta = self.meta.lock().await;
        self.check_writable()?;
        // Look every cluster up.
        struct Plan {
            c: u64,
            a: u64,
            b: u64,
            entry: L2Entry,
            in_place: bool,
        }
        let mut plans = Vec::new();
        for c in c0..c1 {
            let l2off = self.ensure_l2(c / g.l2_entries).await?;
            let (raw, bm) = self.l2_get(l2off, c % g.l2_entries).await?;
            let entry = self.decode_entry(c * cs, raw, bm).await?;
            let in_place =
                matches!(entry, L2Entry::Normal { copied: true, .. }) && entry.is_mapped(&g);
            let a = offset.max(c * cs) - c * cs;
            let b = end.min((c + 1) * cs) - c * cs;
            plans.push(Plan {
                c,
                a,
                b,
                entry,
                in_place,
            });
        }
        // With an external data file, host offsets equal guest offsets and
        // nothing is allocated; its content is unknown, so zero COW is
        // always written.
        let n_new = if g.data_file {
            0
        } else {
            plans.iter().filter(|p| !p.in_place).count() as u64
        };
        // Where the new clusters are, which host ranges read as zeroes until
        // written, and whether the file covers them already.
        let new = if g.data_file {
            NewClusters {
                offset: 0,
                fresh: 0..u64::MAX,
                covered: true,
            }
        } else if n_new > 0 {
            self.alloc_data_clusters(n_new).await?
        } else {
            let hw = self.st().high_water;
            NewClusters {
                offset: 0,
                fresh: hw..u64::MAX,
                covered: true,
            }
        };
        let base = new.offset;
        drop(meta);
        let mut alloc = Allocation {
            guard: Some(guard),
            offset,
            len,
            ranges: Vec::new(),
            updates: Vec::new(),
            frees: Vec::new(),
            reserved: if n_new > 0 {
                vec![(base, n_new * cs)]
            } else {
                Vec::new()
            },
            needs_data_sync: false,
        };
        let mut cows: Vec<Cow> = Vec::new();
        let mut next_new = base;
        let ss = g.subcluster_size;
        for p in &plans {
            let cstart = p.c * cs;
            let (host, old_alloc, old_zero, old_src): (u64, u32, u32, Option<CowSource>) =
                match p.entry {
                    L2Entry::Normal {
                        host, alloc, zero, ..
                    } if p.in_place => (host, alloc, zero, None),
                    L2Entry::Normal {
                        host,
                        alloc: old_alloc,
                        zero,
                        ..
                    } => {
                        if host != 0 && !g.data_file {
                            alloc.frees.push((host, cs));
                        }
                        let h = if g.data_file { cstart } else { next_new };
                        if !g.data_file {
                            next_new += cs;
                        }
                        (
                            h,
                            old_alloc,
                            zero,
                            (host != 0).then_some(CowSource::Host(host)),
                        )
                    }
                    L2Entry::Compressed { raw } => {
                        let (off, clen, start, alen) = g.compressed_range(raw);
                        alloc.frees.push((start, alen));
                        let data = match self.decompress_cluster(off, clen).await {
                            Ok(d) => d,
                            Err(e) => {
                                self.abort(alloc).await;
                                return Err(e);
                            }
                        };
                        let h = next_new;
                        next_new += cs;
                        (
                            h,
                            low_bits(g.subclusters),
                            0,
                            Some(CowSource::Buffer(Arc::new(data), 0)),
                        )
                    }
                };
            let mut new_alloc = if p.in_place { old_alloc } else { 0 };
            let mut new_zero = old_zero;
            for s in 0..g.subclusters {
                let s0 = s as u64 * ss;
                let s1 = s0 + ss;
                let bit = 1u32 << s;
                let touched = p.a < s1 && s0 < p.b;
                // Source of this subcluster's old content.
                let src = if old_alloc & bit != 0 {
                    match &old_src {
                        None => None, // in place: already there
                        Some(CowSource::Host(h)) => Some(CowSource::Host(h + s0)),
                        Some(CowSource::Buffer(b, _)) => {
                            Some(CowSource::Buffer(b.clone(), s0 as usize))
                        }
                        Some(o) => Some(o.clone()),
                    }
                } else if old_zero & bit != 0 {
                    Some(CowSource::Zero)
                } else {
                    Some(CowSource::Backing)
                };
                if touched {
                    new_alloc |= bit;
                    new_zero &= !bit;
                    if let Some(src) = src {
                        let (h0, h1) = (s0, p.a.max(s0));
                        if h1 > h0 {
                            cows.push(Cow {
                                guest: cstart + h0,
                                dest: host + h0,
                                len: h1 - h0,
                                src: src.clone(),
                            });
                        }
                        let (t0, t1) = (p.b.min(s1), s1);
                        if t1 > t0 {
                            let src = match src {
                                CowSource::Host(h) => CowSource::Host(h + (t0 - s0)),
                                CowSource::Buffer(b, o) => {
                                    CowSource::Buffer(b, o + (t0 - s0) as usize)
                                }
                                o => o,
                            };
                            cows.push(Cow {
                                guest: cstart + t0,
                                dest: host + t0,
                                len: t1 - t0,
                                src,
                            });
                        }
                    }
                } else if !p.in_place {
                    if let Some(src @ (CowSource::Host(_) | CowSource::Buffer(..))) = src {
                        new_alloc |= bit;
                        new_zero &= !bit;
                        cows.push(Cow {
                            guest: cstart + s0,
                            dest: host + s0,
                            len: ss,
                            src,
                        });
                    }
                }
            }
            let r = HostRange {
                guest_offset: cstart + p.a,
                host_offset: host + p.a,
                len: p.b - p.a,
            };
            match alloc.ranges.last_mut() {
                Some(l) if l.host_offset + l.len == r.host_offset => l.len += r.len,
                _ => alloc.ranges.push(r),
            }
            // Clusters past the old end of the file read as zeroes until
            // written; anything else may hold older data.
            if (p.in_place && new_alloc & !old_alloc != 0)
                || (!p.in_place && (g.data_file || !new.fresh.contains(&host)))
            {
                alloc.needs_data_sync = true;
            }
            if !p.in_place || new_alloc != old_alloc || new_zero != old_zero {
                let (raw, bitmap) = L2Entry::encode_normal(&g, host, true, new_alloc, new_zero);
                alloc.updates.push(Update {
                    cluster: p.c,
                    raw,
                    bitmap,
                });
            }
        }
        // Copied old content (the rest of a cluster the guest wrote part of)
        // must be stable before the L2 entry maps its new place: it may be
        // data the guest flushed long ago. Without a backing file, unallocated
        // ranges are zeroes, like zero clusters.
        // Encrypted zeroes are data too.
        let copies = |c: &Cow| match c.src {
            _ if encrypted => true,
            CowSource::Zero => false,
            CowSource::Backing => backing.present(),
            CowSource::Host(_) | CowSource::Buffer(..) => true,
        };
        if cows.iter().any(copies) {
            alloc.needs_data_sync = true;
        }
        // QEMU zeroes the new clusters from the start of their copy-on-write
        // head to the end of their tail with one write-zeroes request on its
        // file when every copied part reads as zeroes (cluster_alloc_space),
        // and copies nothing then. Here zero parts are skipped in fresh
        // clusters and written as zeroes elsewhere, at the same point; under a
        // file that watches requests (blkdebug) the request is QEMU's, so that
        // its rules see it.
        // (Over a watched file, backing ranges with nothing allocated in the
        // chain count as zeroes too, as QEMU's block status says.)
        let watched = self.io.watches_requests();
        let run = base..base + n_new * cs;
        let mut bounds: Option<(u64, u64)> = None;
        let mut all_zero = true;
        for c in cows.iter().filter(|c| run.contains(&c.dest)) {
            let z = match c.src {
                _ if encrypted => false,
                CowSource::Zero => true,
                CowSource::Backing => {
                    !backing.present() || (watched && backing.reads_as_zero(c.guest, c.len).await)
                }
                _ => false,
            };
            all_zero &= z;
            let (lo, hi) = bounds.unwrap_or((c.dest, c.dest + c.len));
            bounds = Some((lo.min(c.dest), hi.max(c.dest + c.len)));
        }
        let mut res = Ok(());
        if let Some((start, end)) = bounds.filter(|_| all_zero) {
            self.io.debug_event(DebugEvent::ClusterAllocSpace);
            if watched {
                res = self
                    .data_io()
                    .write_zeroes_request(start, end - start)
                    .await
                    .map_err(Error::from);
                cows.retain(|c| !run.contains(&c.dest));
            }
        }
        // Zero COW into fresh clusters is skipped; make sure the file still
        // covers the whole of the last new cluster: one zeroed sector,
        // written before the COW and the guest data that may overwrite it.
        if let Some(p) = plans.iter().rev().find(|p| !p.in_place) {
            if res.is_ok() && n_new > 0 && p.b < cs && new.fresh.contains(&base) && !new.covered {
                let end = base + n_new * cs;
                res = self
                    .io
                    .write_zeroes(end - 512, 512)
                    .await
                    .map_err(Error::from);
            }
        }
        if res.is_ok() {
            res = self.do_cow(&cows, &new.fresh, backing).await;
        }
        if let Err(e) = res {
            self.abort(alloc).await;
            return Err(e);
        }
        Ok(alloc)
    }

    async fn do_cow<B: Backing>(
        &self,
        cows: &[Cow],
        fresh: &std::ops::Range<u64>,
        backing: &B,
    ) -> Result<()> {
        let size = self.size();
        let cipher = self.data_cipher()?;
        for c in cows {
            let mut buf;
            let data: &[u8] = match &c.src {
                // Encrypted zeroes are written like any other data.
                CowSource::Zero if cipher.is_some() => {
                    buf = vec![0u8; c.len as usize];
                    &buf
                }
                CowSource::Backing if cipher.is_some() && !backing.present() => {
                    buf = vec![0u8; c.len as usize];
                    &buf
                }
                CowSource::Zero => {
                    if !fresh.contains(&c.dest) {
                        self.io.debug_event(DebugEvent::CowWrite);
                        self.data_io().write_zeroes(c.dest, c.len).await?;
                    }
                    continue;
                }
                CowSource::Backing => {
                    if !backing.present() {
                        if !fresh.contains(&c.dest) {
                            self.io.debug_event(DebugEvent::CowWrite);
                            self.data_io().write_zeroes(c.dest, c.len).await?;
                        }
                        continue;
                    }
                    // QEMU reads through its own read path, which raises
                    // the event of the kind of data read.
                    self.io.debug_event(DebugEvent::CowRead);
                    self.io.debug_event(DebugEvent::ReadBackingAio);
                    buf = vec![0u8; c.len as usize];
                    // The last cluster may extend past the virtual size.
                    let n = size.saturating_sub(c.guest).min(c.len) as usize;
                    if n > 0 {
                        backing.read(c.guest, &mut buf[..n]).await?;
                    }
                    &buf
                }
                CowSource::Host(h) => {
                    self.io.debug_event(DebugEvent::CowRead);
                    self.io.debug_event(DebugEvent::ReadAio);
                    buf = vec![0u8; c.len as usize];
                    self.data_io().read_at(*h, &mut buf).await?;
                    // The old cluster's sectors have its host offsets as IVs.
                    if let Some(cipher) = cipher {
                        cipher.decrypt(*h, &mut buf)?;
                    }
                    &buf
                }
                CowSource::Buffer(b, o) => &b[*o..*o + c.len as usize],
            };
            self.io.debug_event(DebugEvent::CowWrite);
            if let Some(cipher) = cipher {
                let mut enc = data.to_vec();
                cipher.encrypt(c.dest, &mut enc)?;
                self.data_io().write_at(c.dest, &enc).await?;
                continue;
            }
            self.data_io().write_at(c.dest, data).await?;
        }
        Ok(())
    }

    /// Links the L2 entries of an allocation after its guest data was
    /// written. The old clusters it replaced are freed at the next flush.
    ///
    /// The new entries reach the file (the host's page cache) before this
    /// returns, so that a write the guest was told is done reads back after the
    /// daemon is killed while the guest runs on; a flush is still what makes
    /// them stable. What they depend on goes first: with lazy refcounts the
    /// dirty bit, otherwise the refcounts (and one sync, so that a power loss
    /// cannot leave an entry on disk whose refcount is not; none for reserved
    /// clusters, whose refcounts are stable already), and the guest data when
    /// the entry maps a cluster that held other data (a sync).
    pub async fn commit(&self, mut alloc: Allocation<'_, I>) -> Result<()> {
        if alloc.updates.is_empty() {
            return Ok(());
        }
        let _meta = self.meta.lock().await;
        self.check_writable()?;
        let g = self.g;
        let mut tables: Vec<(u64, u64)> = Vec::with_capacity(alloc.updates.len());
        for u in &alloc.updates {
            let l1e = self.st().l1[(u.cluster / g.l2_entries) as usize];
            let l2off = l1e & OFFSET_MASK;
            let idx = (u.cluster % g.l2_entries) as usize;
            self.with_table(TableKind::L2, l2off, |e| {
                if g.extended {
                    layout::put_u64(&mut e.data, 2 * idx, u.raw);
                    layout::put_u64(&mut e.data, 2 * idx + 1, u.bitmap);
                } else {
                    layout::put_u64(&mut e.data, idx, u.raw);
                }
                e.dirty = true;
                e.gen += 1;
            })
            .await?;
            tables.push((l2off, idx as u64));
        }
        self.prepare_new_references_of_write().await?;
        // Reserved clusters have stable refcounts already: no sync unless the
        // data must be stable first.
        if alloc.needs_data_sync || self.new_references_need_sync() {
            // This covers the data the entries depend on: the flush that writes
            // the tables need not sync for them again.
            self.sync_unchecked().await?;
        }
        self.write_l2_entries(&mut tables).await?;
        {
            let mut st = self.st();
            st.pending_frees
                .extend(alloc.frees.drain(..).map(|(o, l)| (o, l, true)));
        }
        alloc.reserved.clear();
        alloc.guard.take();
        self.trim_caches().await
    }

    /// Writes the given entries (L2 table offset, index) of cached L2 tables
    /// to the file, adjacent ones together. The tables stay dirty in the cache
    /// (a flush writes them whole, in order).
    async fn write_l2_entries(&self, entries: &mut [(u64, u64)]) -> Result<()> {
        // Entries that drop references leave leaks until the refcounts
        // decrease (after a flush): a kill in between must leave the image
        // dirty, so that the next writable open reclaims them.
        self.mark_dirty().await?;
        let esz = if self.g.extended { 16 } else { 8 };
        entries.sort_unstable();
        let mut i = 0;
        while i < entries.len() {
            let (table, first) = entries[i];
            let mut last = first;
            let mut j = i + 1;
            while j < entries.len() && entries[j].0 == table && entries[j].1 <= last + 1 {
                last = last.max(entries[j].1);
                j += 1;
            }
            let (a, b) = ((first * esz) as usize, ((last + 1) * esz) as usize);
            let bytes = self
                .read_table(TableKind::L2, table, |e| e.data[a..b].to_vec())
                .await?;
            // No event: QEMU writes the table at the next flush (l2_update,
            // raised there by `write_table`), so an l2_update rule fails the
            // flush here too, not this early write of the entries.
            self.io.write_at(table + a as u64, &bytes).await?;
            i = j;
        }
        Ok(())
    }

    /// Gives up an allocation: frees its reserved clusters and releases the
    /// guest range.
    pub async fn abort(&self, mut alloc: Allocation<'_, I>) {
        if !alloc.reserved.is_empty() {
            let _meta = self.meta.lock().await;
            // Never referenced: safe to free at the next flush.
            // Never written either: no space to give back.
            self.st()
                .pending_frees
                .extend(alloc.reserved.drain(..).map(|(o, l)| (o, l, false)));
        }
        alloc.guard.take();
    }

    /// Convenience: allocate, write `data`, commit (copies; for tools/tests).
    pub async fn write<B: Backing>(&self, offset: u64, data: &[u8], backing: &B) -> Result<()> {
        let a = self.allocate(offset, data.len() as u64, backing).await?;
        let cipher = self.data_cipher()?;
        for r in a.ranges() {
            let s = (r.guest_offset - offset) as usize;
            let mut part = std::borrow::Cow::Borrowed(&data[s..s + r.len as usize]);
            if let Some(c) = cipher {
                c.encrypt(r.host_offset, part.to_mut())?;
            }
            if let Err(e) = self.data_io().write_at(r.host_offset, &part).await {
                self.abort(a).await;
                return Err(e.into());
            }
        }
        self.commit(a).await
    }

    /// Writes one whole guest cluster compressed (for image copies, like
    /// `qemu-img convert -c`). `offset` must be cluster aligned and `data`
    /// one cluster long (shorter only for the last cluster of the disk).
    /// Data that does not compress is written normally. Compressed clusters
    /// are packed back to back into host clusters.
    pub async fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        if self.is_encrypted() {
            return Err(Error::Unsupported(
                "compressed writes to encrypted images".into(),
            ));
        }
        let g = self.g;
        let cs = g.cluster_size;
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if !g.aligned(offset) || len == 0 || (len != cs && offset + len != self.size()) {
            return Err(Error::Unaligned {
                offset,
                len,
                align: cs,
            });
        }
        let mut full = data.to_vec();
        full.resize(cs as usize, 0);
        let compressed = if g.data_file {
            None
        } else {
            crate::compress::compress(g.compression, &full, cs as usize - 512)
        };
        let Some(c) = compressed else {
            return self.write(offset, data, &crate::NoBacking).await;
        };
        let cl = offset / cs;
        let _guard = self.lock_range(cl, cl + 1, false).await;
        let _meta = self.meta.lock().await;
        self.check_writable()?;
        let l2off = self.ensure_l2(cl / g.l2_entries).await?;
        let idx = cl % g.l2_entries;
        let (raw, bm) = self.l2_get(l2off, idx).await?;
        let old = self.decode_entry(offset, raw, bm).await?;
        let host = self.alloc_bytes(c.len() as u64).await?;
        // QEMU points the cached L2 entry at the bytes before it writes the data;
        // here the entry changes after the write, but the events keep its order.
        self.io.debug_event(DebugEvent::L2UpdateCompressed);
        self.io.debug_event(DebugEvent::WriteCompressed);
        self.io.write_at(host, &c).await?;
        let entry = g.compressed_entry(host, c.len() as u64);
        // Compressed data shares host clusters: never mapped before it is stable.
        self.st().l2_needs_data_sync = true;
        self.with_table(TableKind::L2, l2off, |e| {
            if g.extended {
                layout::put_u64(&mut e.data, 2 * idx as usize, entry);
                layout::put_u64(&mut e.data, 2 * idx as usize + 1, 0);
            } else {
                layout::put_u64(&mut e.data, idx as usize, entry);
            }
            e.dirty = true;
            e.gen += 1;
        })
        .await?;
        match old {
            L2Entry::Normal { host, .. } if host != 0 => {
                self.st().pending_frees.push((host, cs, true))
            }
            L2Entry::Compressed { raw } => {
                let (_, _, s, l) = g.compressed_range(raw);
                self.st().pending_frees.push((s, l, true));
            }
            _ => {}
        }
        self.trim_caches().await
    }

    /// Makes `[offset, offset+len)` read as zeroes without writing data:
    /// zero flags (v3) or zero subclusters. With `may_unmap`, host clusters
    /// of whole zeroed clusters are released. The range must be aligned to
    /// the subcluster size (the cluster size without extended L2), except
    /// that it may end at the end of the disk. Version 2 images without a
    /// backing file are handled by deallocation; with one, `Unsupported`.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zero_or_discard(offset, len, Some(may_unmap))
            .await
            .map(|_| ())
    }

    /// Discards whole clusters in the range (partial clusters at either end
    /// are ignored, as QEMU does). With a backing file, v3 images get zero
    /// clusters so that the backing data does not reappear. Returns the host
    /// ranges whose refcount drops to zero, which the caller may punch.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.zero_or_discard(offset, len, None).await
    }

    async fn zero_or_discard(
        &self,
        offset: u64,
        len: u64,
        zero: Option<bool>,
    ) -> Result<Vec<(u64, u64)>> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let g = self.g;
        let cs = g.cluster_size;
        let size = self.size();
        let end = offset + len;
        let has_backing = self.st().hdr.backing_file.is_some();
        if self.data_file_raw() {
            // The data file must stay a consistent raw image: zeroes are
            // written as data by the caller, and discard keeps the data.
            return match zero {
                None => Ok(Vec::new()),
                Some(_) => Err(Error::Unsupported(
                    "zero clusters with a raw external data file".into(),
                )),
            };
        }
        let (start, stop) = if zero.is_some() {
            let al = g.subcluster_size;
            if !offset.is_multiple_of(al) || (!end.is_multiple_of(al) && end != size) {
                return Err(Error::Unaligned {
                    offset,
                    len,
                    align: al,
                });
            }
            if !g.v3 && has_backing {
                return Err(Error::Unsupported(
                    "zero clusters need qcow2 version 3 with a backing file".into(),
                ));
            }
            (offset, end)
        } else {
            let s = offset.div_ceil(cs) * cs;
            let e = if end == size { end } else { end / cs * cs };
            if s >= e {
                return Ok(Vec::new());
            }
            (s, e)
        };
        if start >= stop {
            return Ok(Vec::new());
        }
        let c0 = start / cs;
        let c1 = (stop - 1) / cs + 1;
        let _guard = self.lock_range(c0, c1, false).await;
        let _meta = self.meta.lock().await;
        self.check_writable()?;
        let mut freed: Vec<(u64, u64)> = Vec::new();
        let mut pos = start;
        while pos < stop {
            let l1i = pos / g.l2_span();
            let chunk_end = stop.min((l1i + 1) * g.l2_span());
            let l1e = self.st().l1[l1i as usize];
            if l1e & OFFSET_MASK == 0 && !has_backing {
                pos = chunk_end;
                continue;
            }
            if l1e & OFFSET_MASK == 0 && zero.is_none() {
                // Discard of unallocated clusters with a backing file: QEMU
                // writes zero clusters; do so only for allocated L2 tables.
                pos = chunk_end;
                continue;
            }
            let l2off = self.ensure_l2(l1i).await?;
            let first = pos / cs;
            let last = (chunk_end - 1) / cs;
            let mut changes: Vec<(u64, u64, u64)> = Vec::new();
            let mut chunk_frees: Vec<(u64, u64)> = Vec::new();
            for c in first..=last {
                let (raw, bm) = self.l2_get(l2off, c % g.l2_entries).await?;
                let entry = self.decode_entry(c * cs, raw, bm).await?;
                let a = pos.max(c * cs) - c * cs;
                let b = chunk_end.min((c + 1) * cs) - c * cs;
                let whole = a == 0 && (b == cs || c * cs + b >= size);
                let (old_host, old_copied) = match entry {
                    L2Entry::Normal { host, copied, .. } => (host, copied),
                    L2Entry::Compressed { .. } => (0, false),
                };
                let old_mapped = matches!(entry, L2Entry::Normal { .. }) && entry.is_mapped(&g);
                let free_old =
                    |freed: &mut Vec<(u64, u64)>, frees: &mut Vec<(u64, u64)>| match entry {
                        L2Entry::Normal { host, copied, .. } if entry.is_mapped(&g) => {
                            if !g.data_file {
                                frees.push((host, cs));
                            }
                            if copied {
                                match freed.last_mut() {
                                    Some(l) if l.0 + l.1 == host => l.1 += cs,
                                    _ => freed.push((host, cs)),
                                }
                            }
                        }
                        L2Entry::Compressed { raw } => {
                            let (_, _, s, l) = g.compressed_range(raw);
                            frees.push((s, l));
                        }
                        _ => {}
                    };
                let mut frees = Vec::new();
                let new = match zero {
                    None => {
                        if !whole {
                            continue;
                        }
                        free_old(&mut freed, &mut frees);
                        if has_backing && g.v3 {
                            L2Entry::encode_normal(&g, 0, false, 0, low_bits(g.subclusters))
                        } else {
                            (0, 0)
                        }
                    }
                    Some(may_unmap) => {
                        if whole || !g.extended {
                            let keep = g.v3 && !may_unmap && old_copied && old_mapped;
                            if !keep {
                                free_old(&mut freed, &mut frees);
                            }
                            if !g.v3 {
                                (0, 0)
                            } else {
                                L2Entry::encode_normal(
                                    &g,
                                    if keep { old_host } else { 0 },
                                    keep,
                                    0,
                                    low_bits(g.subclusters),
                                )
                            }
                        } else {
                            // Part of a cluster with subclusters.
                            let (host, copied, alloc, zbits) = match entry {
                                L2Entry::Normal {
                                    host,
                                    copied,
                                    alloc,
                                    zero,
                                } => (host, copied, alloc, zero),
                                L2Entry::Compressed { .. } => {
                                    // The caller writes zeroes as data instead.
                                    return Err(Error::Unsupported(
                                        "zeroing part of a compressed cluster".into(),
                                    ));
                                }
                            };
                            let s0 = (a / g.subcluster_size) as u32;
                            let s1 = (b.div_ceil(g.subcluster_size)) as u32;
                            let m = low_bits(s1) & !low_bits(s0);
                            L2Entry::encode_normal(&g, host, copied, alloc & !m, zbits | m)
                        }
                    }
                };
                if (new.0, new.1) != (raw, bm) {
                    changes.push((c, new.0, new.1));
                }
                chunk_frees.append(&mut frees);
            }
            if !changes.is_empty() {
                // Entries that drop references need nothing on disk first (a
                // crash leaks at worst); they reach the file at once, like
                // allocations (see `commit`).
                let mut written: Vec<(u64, u64)> = changes
                    .iter()
                    .map(|&(c, _, _)| (l2off, c % g.l2_entries))
                    .collect();
                self.with_table(TableKind::L2, l2off, |e| {
                    for (c, raw, bm) in changes {
                        let i = (c % g.l2_entries) as usize;
                        if g.extended {
                            layout::put_u64(&mut e.data, 2 * i, raw);
                            layout::put_u64(&mut e.data, 2 * i + 1, bm);
                        } else {
                            layout::put_u64(&mut e.data, i, raw);
                        }
                    }
                    e.dirty = true;
                    e.gen += 1;
                })
                .await?;
                self.write_l2_entries(&mut written).await?;
            }
            // Only now that the entries changed may their clusters be freed.
            // Guest discards and zero writes: the caller punches what they
            // free (`pass-discard-request`).
            self.st()
                .pending_frees
                .extend(chunk_frees.drain(..).map(|(o, l)| (o, l, false)));
            pos = chunk_end;
            self.trim_caches().await?;
        }
        Ok(freed)
    }

    /// Writes metadata back in dependency order and flushes the file (a guest
    /// flush). With lazy refcounts, refcount blocks stay in the cache until
    /// [`Qcow2::close`] (or until the cache overflows).
    pub async fn flush(&self) -> Result<()> {
        let _meta = self.meta.lock().await;
        self.flush_guest_locked().await
    }

    /// Writes all metadata (refcounts too) and, with lazy refcounts, clears the
    /// dirty bit (clean close).
    pub async fn close(&self) -> Result<()> {
        let _meta = self.meta.lock().await;
        self.flush_locked().await?;
        let clear = {
            let mut st = self.st();
            let c = st.dirty_marked && st.writable && !st.corrupt;
            if c {
                st.hdr.incompatible_features &= !crate::header::incompat::DIRTY;
                st.dirty_marked = false;
            }
            c
        };
        if clear {
            self.write_header().await?;
            self.io.flush().await?;
        }
        Ok(())
    }

    /// Shrinks the disk: clusters past the new end are freed (L2 tables that
    /// map nothing below it too). Refused with internal snapshots, as QEMU does.
    async fn shrink(&self, new_size: u64) -> Result<()> {
        let _all = self.lock_range(0, u64::MAX, false).await;
        let _meta = self.meta.lock().await;
        self.check_writable()?;
        if !self.st().snapshots.is_empty() {
            return Err(Error::Unsupported(
                "shrinking an image with internal snapshots".into(),
            ));
        }
        let g = self.g;
        let cs = g.cluster_size;
        let span = g.l2_span();
        let first = new_size.div_ceil(cs);
        let old_size = self.size();
        let (l1, l1_off) = {
            let st = self.st();
            (st.l1.clone(), st.hdr.l1_table_offset)
        };
        let mut frees: Vec<(u64, u64)> = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            let (lo, hi) = (i as u64 * g.l2_entries, (i as u64 + 1) * g.l2_entries);
            if l2 == 0 || hi <= first || lo * cs >= old_size.div_ceil(span) * span {
                continue;
            }
            let whole = lo >= first;
            let l2 = if whole {
                self.check_l2_offset(i as u64, e).await?
            } else {
                self.ensure_l2(i as u64).await?
            };
            let from = first.max(lo) - lo;
            let raws: Vec<(u64, u64)> = self
                .read_table(TableKind::L2, l2, |t| {
                    (from..g.l2_entries)
                        .map(|j| {
                            let j = j as usize;
                            layout::l2_entry(&t.data, j, g.extended)
                        })
                        .collect()
                })
                .await?;
            for (k, (raw, bm)) in raws.into_iter().enumerate() {
                let guest = (lo + from + k as u64) * cs;
                match self.decode_entry(guest, raw, bm).await? {
                    L2Entry::Normal { host, .. } if host != 0 && !g.data_file => {
                        frees.push((host, cs))
                    }
                    L2Entry::Compressed { raw } => {
                        let (_, _, s, l) = g.compressed_range(raw);
                        frees.push((s, l));
                    }
                    _ => {}
                }
            }
            if whole {
                self.st().l1[i] = 0;
                self.io.debug_event(DebugEvent::L1ShrinkWriteTable);
                self.io
                    .write_at(l1_off + i as u64 * 8, &0u64.to_be_bytes())
                    .await?;
                // Shared L2 tables are only referenced once by the active L1.
                frees.push((l2, cs));
            } else {
                self.with_table(TableKind::L2, l2, |t| {
                    for j in from as usize..g.l2_entries as usize {
                        if g.extended {
                            layout::put_u64(&mut t.data, 2 * j, 0);
                            layout::put_u64(&mut t.data, 2 * j + 1, 0);
                        } else {
                            layout::put_u64(&mut t.data, j, 0);
                        }
                    }
                    t.dirty = true;
                    t.gen += 1;
                })
                .await?;
            }
        }
        if frees
            .iter()
            .any(|&(o, _)| self.st().meta_clusters.contains(&o))
        {
            self.io.debug_event(DebugEvent::L1ShrinkFreeL2Clusters);
        }
        self.st()
            .pending_frees
            .extend(frees.drain(..).map(|(o, l)| (o, l, true)));
        self.st().hdr.size = new_size;
        self.write_header().await?;
        self.flush_locked().await
    }

    /// Changes the virtual size. Growing may move the L1 table.
    pub async fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        self.bitmaps_allow_resize()?;
        if new_size < self.size() {
            return self.shrink(new_size).await;
        }
        let _meta = self.meta.lock().await;
        let g = self.g;
        let cs = g.cluster_size;
        if new_size > i64::MAX as u64 {
            return Err(Error::NoSpace("size too large".into()));
        }
        let need = crate::header::l1_entries_for(new_size, g.cluster_bits, g.extended);
        if need * 8 > crate::header::MAX_L1_BYTES {
            return Err(Error::NoSpace("L1 table would exceed 32 MiB".into()));
        }
        let (old_len, old_off) = {
            let st = self.st();
            (st.l1.len() as u64, st.hdr.l1_table_offset)
        };
        if need > old_len {
            let k = (need * 8).div_ceil(cs);
            self.io.debug_event(DebugEvent::L1GrowAllocTable);
            let new_off = self.alloc_clusters(k).await?;
            let mut table = vec![0u8; (k * cs) as usize];
            for (i, &e) in self.st().l1.iter().enumerate() {
                layout::put_u64(&mut table, i, e);
            }
            self.io.debug_event(DebugEvent::L1GrowWriteTable);
            self.io.write_at(new_off, &table).await?;
            self.write_dirty_refcounts().await?;
            self.io.flush().await?;
            {
                let mut st = self.st();
                st.l1.resize(need as usize, 0);
                st.hdr.l1_table_offset = new_off;
                st.hdr.l1_size = need as u32;
                st.hdr.size = new_size;
            }
            self.io.debug_event(DebugEvent::L1GrowActivateTable);
            self.write_header().await?;
            self.io.flush().await?;
            if old_len > 0 {
                self.io.debug_event(DebugEvent::ClusterFree);
                let old_k = (old_len * 8).div_ceil(cs);
                for c in old_off / cs..old_off / cs + old_k {
                    self.rc_add(c, -1).await?;
                }
            }
        } else {
            self.st().hdr.size = new_size;
            self.write_header().await?;
            self.io.flush().await?;
        }
        Ok(())
    }
}
