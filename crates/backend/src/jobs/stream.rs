//! The `stream` job (QEMU's block-stream): copies into the top node every range
//! that the layers between it and the base provide, so that the top no longer
//! needs them; at finalization the top's backing becomes the base.
//!
//! Each copy is serialised against the top's other writers (a guest write to the
//! range waits for it, and the copy skips a range the guest has meanwhile written),
//! as QEMU's copy-on-read does.

use super::core::{JobCore, RateLimit};
use super::JobMsg;
use crate::config::OnError;
use crate::control::ControlMsg;
use blocklayer::aio::iovec::{AlignedBuf, IoVec};
use blocklayer::backend::BlockBackend;
use blocklayer::Node;
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// Bytes a job looks at and copies at once (QEMU's stream uses 512 KiB too).
pub const CHUNK: u64 = 512 * 1024;

/// The error text of a job ended by a cancel (not reported as an error).
pub const CANCELLED: &str = "cancelled";

/// Whether `offset..` is allocated in `top` or any layer below it down to, but not
/// including, `base` (QEMU's `bdrv_is_allocated_above`), and for how many bytes.
pub async fn allocated_above(
    top: &Arc<Node>,
    base: Option<&Arc<Node>>,
    offset: u64,
    len: u64,
) -> blocklayer::Result<(bool, u64)> {
    let mut n = len;
    let mut layer = Some(top.clone());
    while let Some(l) = layer {
        if base.is_some_and(|b| Arc::ptr_eq(b, &l)) {
            break;
        }
        if offset >= l.size() {
            // Past this layer's end: reads there are zeroes from its view.
            break;
        }
        let (alloc, m) = l.driver().is_allocated(offset, n).await?;
        if alloc {
            return Ok((true, m));
        }
        n = m;
        layer = l.backing();
    }
    Ok((false, n))
}

/// Reads `offset..+len` of `src` and writes it to `dst` (a copy the job owns).
pub async fn copy_range(
    src: &Node,
    dst: &Node,
    offset: u64,
    len: u64,
) -> Result<(), (bool, String)> {
    let buf = AlignedBuf::try_zeroed(len as usize, 4096)
        .ok_or_else(|| (true, "Cannot allocate memory".to_string()))?;
    let iov = IoVec::from_buf(Arc::new(buf));
    src.read(offset, iov.clone())
        .await
        .map_err(|e| (true, e.to_string()))?;
    dst.write_copied(offset, iov)
        .await
        .map_err(|e| (false, e.to_string()))
}

/// What an I/O error does to the job (`on-error`); `Ok` means go on (retry).
pub async fn on_error(
    core: &JobCore,
    policy: OnError,
    tx: &Sender<ControlMsg>,
    read: bool,
    msg: String,
    errno_enospc: bool,
) -> Result<bool, String> {
    let id = core.id.clone();
    match policy {
        OnError::Ignore => {
            let _ = tx.send(ControlMsg::Job(JobMsg::ErrorIgnored { id, read }));
            Ok(false)
        }
        OnError::Stop | OnError::Enospc if policy == OnError::Stop || errno_enospc => {
            core.set_paused(true);
            let _ = tx.send(ControlMsg::Job(JobMsg::ErrorStop { id, read }));
            core.pause_point(true)
                .await
                .map_err(|_| CANCELLED.to_string())?;
            Ok(true)
        }
        _ => Err(msg),
    }
}

pub struct Stream {
    pub core: Arc<JobCore>,
    /// The job's handle on the top node (write-unchanged taken).
    pub blk: BlockBackend,
    /// Users the job keeps on the intermediate nodes (resize not shared).
    pub holds: Vec<BlockBackend>,
    /// The layer that stays (streaming stops above it); `None`: the whole chain.
    pub base: Option<Arc<Node>>,
    pub on_error: OnError,
    pub tx: Sender<ControlMsg>,
}

impl Stream {
    pub async fn run(self) -> Result<(), String> {
        let core = &self.core;
        let size = self.blk.node().size();
        core.set_len(size);
        let mut rl = RateLimit::default();
        let mut offset = 0;
        while offset < size {
            core.pause_point(false)
                .await
                .map_err(|_| CANCELLED.to_string())?;
            let want = (size - offset).min(CHUNK);
            let r = self.chunk(offset, want).await;
            let (n, copied) = match r {
                Ok(v) => v,
                Err((read, msg)) => {
                    let enospc = msg.contains("No space");
                    if on_error(core, self.on_error, &self.tx, read, msg, enospc).await? {
                        continue;
                    }
                    (want, 0)
                }
            };
            offset += n;
            core.progress(n);
            let d = rl.account(core.speed(), copied);
            if !d.is_zero() {
                core.sleep(d).await;
            }
        }
        drop(self.holds);
        Ok(())
    }

    /// Streams one range: returns the bytes looked at and those copied.
    async fn chunk(&self, offset: u64, len: u64) -> Result<(u64, u64), (bool, String)> {
        let base = self.base.clone();
        self.blk
            .with_node(|top| async move {
                let (alloc, n) = top
                    .driver()
                    .is_allocated(offset, len)
                    .await
                    .map_err(|e| (true, e.to_string()))?;
                if alloc {
                    return Ok((n, 0));
                }
                let Some(below) = top.backing() else {
                    return Ok((n, 0));
                };
                let (above, n) = allocated_above(&below, base.as_ref(), offset, n)
                    .await
                    .map_err(|e| (true, e.to_string()))?;
                if !above {
                    return Ok((n, 0));
                }
                let _lock = top.copy_lock(offset, n).await;
                // The guest may have written the range meanwhile: its data stays.
                let (alloc, m) = top
                    .driver()
                    .is_allocated(offset, n)
                    .await
                    .map_err(|e| (true, e.to_string()))?;
                if alloc {
                    return Ok((m, 0));
                }
                copy_range(&top, &top, offset, m).await?;
                Ok((m, m))
            })
            .await
    }
}
