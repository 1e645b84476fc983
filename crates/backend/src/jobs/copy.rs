//! What stream and commit share: walking a chain for allocated ranges, copying a
//! range, and one pass over a node in chunks with pause points, `on-error`,
//! progress and the rate limit.

use super::core::{JobCore, RateLimit};
use super::JobMsg;
use crate::config::OnError;
use crate::control::ControlMsg;
use blocklayer::aio::iovec::{AlignedBuf, IoVec};
use blocklayer::backend::ErrorAction;
use blocklayer::{BlockError, Node};
use std::future::Future;
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// Bytes a job looks at and copies at once (QEMU's stream uses 512 KiB too).
pub const CHUNK: u64 = 512 * 1024;

/// The error text of a job ended by a cancel (not reported as an error).
pub const CANCELLED: &str = "cancelled";

/// A failed read or write of a job.
#[derive(Debug)]
pub struct CopyError {
    pub read: bool,
    pub errno: i32,
    pub message: String,
}

impl CopyError {
    pub fn read(e: BlockError) -> CopyError {
        CopyError::new(true, e)
    }

    pub fn write(e: BlockError) -> CopyError {
        CopyError::new(false, e)
    }

    /// The job's error is the errno's text alone, as QEMU's (`strerror(-ret)`).
    fn new(read: bool, e: BlockError) -> CopyError {
        let errno = e.errno();
        CopyError {
            read,
            errno,
            message: if errno > 0 {
                blocklayer::error::strerror(errno)
            } else {
                e.to_string()
            },
        }
    }
}

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

/// How long a job that retries ignored errors waits before it tries again.
const IGNORED_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// A job's copy buffer: one chunk, allocated once for the job's life (a fresh
/// buffer per chunk would fault in and zero 512 KiB every time).
pub struct CopyBuf(Arc<AlignedBuf>);

impl Default for CopyBuf {
    fn default() -> Self {
        CopyBuf::sized(CHUNK)
    }
}

impl CopyBuf {
    /// A buffer of `len` bytes (a job copying larger pieces than a chunk).
    pub fn sized(len: u64) -> CopyBuf {
        CopyBuf(Arc::new(AlignedBuf::zeroed(len as usize, 4096)))
    }
}

/// Reads `offset..+len` (at most the buffer's size) of `src` and writes it to `dst`.
pub async fn copy_range(
    buf: &CopyBuf,
    src: &Node,
    dst: &Node,
    offset: u64,
    len: u64,
) -> Result<(), CopyError> {
    debug_assert!(len as usize <= buf.0.len());
    let iov = IoVec::from_buf(buf.0.clone()).slice(0, len);
    src.read(offset, iov.clone())
        .await
        .map_err(CopyError::read)?;
    dst.write_copied(offset, iov)
        .await
        .map_err(CopyError::write)
}

/// [`copy_range`] within one node (stream's copy-on-read): what the node reads does
/// not change, so its dirty bitmaps are not marked, as in QEMU.
pub async fn copy_range_unchanged(
    buf: &CopyBuf,
    node: &Node,
    offset: u64,
    len: u64,
) -> Result<(), CopyError> {
    debug_assert!(len <= CHUNK);
    let iov = IoVec::from_buf(buf.0.clone()).slice(0, len);
    node.read(offset, iov.clone())
        .await
        .map_err(CopyError::read)?;
    node.write_unchanged(offset, iov)
        .await
        .map_err(CopyError::write)
}

/// What every copying job has: its shared state, its `on-error` policy and the way
/// to the control thread.
pub struct JobCtx {
    pub core: Arc<JobCore>,
    /// The policy for read errors (and for every error of stream and commit).
    pub on_error: OnError,
    /// The policy for write errors (mirror's `on-target-error`).
    pub on_write_error: OnError,
    pub tx: Sender<ControlMsg>,
    pub buf: CopyBuf,
}

impl JobCtx {
    pub fn new(core: Arc<JobCore>, on_error: OnError, tx: Sender<ControlMsg>) -> JobCtx {
        JobCtx {
            core,
            on_error,
            on_write_error: on_error,
            tx,
            buf: CopyBuf::default(),
        }
    }

    fn send(&self, msg: JobMsg) {
        let _ = self.tx.send(ControlMsg::Job(msg));
    }

    /// What an I/O error does to the job (`on-error`, QEMU's
    /// `block_job_error_action`): BLOCK_JOB_ERROR in every case; then `Ok(true)`
    /// retry the range (after a stop and resume), `Ok(false)` go on (ignored), `Err`
    /// end the job with the error (reported).
    pub async fn on_error(&self, e: CopyError) -> Result<bool, String> {
        let id = self.core.id.clone();
        let (read, nospace) = (e.read, e.errno == libc::ENOSPC);
        // The backends' decision table.
        let policy = if read {
            self.on_error
        } else {
            self.on_write_error
        };
        let action = policy.action(e.errno);
        if action == ErrorAction::Stop {
            // Paused before the control thread hears of it: a resume that follows
            // the event at once must find the job paused, not be undone by it.
            self.core.set_paused(true);
        }
        self.send(JobMsg::Error {
            id,
            read,
            action: action.name(),
            nospace,
        });
        match action {
            ErrorAction::Ignore => Ok(false),
            ErrorAction::Report => Err(e.message),
            ErrorAction::Stop => {
                self.core
                    .pause_point(true)
                    .await
                    .map_err(|_| CANCELLED.to_string())?;
                Ok(true)
            }
        }
    }

    /// Reports the job ready (mirror-like jobs).
    pub fn ready(&self) {
        let at = self.core.offset();
        self.core.set_len(at);
        self.send(JobMsg::Ready(self.core.id.clone(), at));
    }

    /// Sleeps as long as the rate limit asks after `copied` bytes.
    pub async fn throttle(&self, rl: &mut RateLimit, copied: u64) {
        let d = rl.account(self.core.speed(), copied);
        if !d.is_zero() {
            self.core.sleep(d).await;
        }
    }

    /// One pass over `0..size` in chunks: `chunk(offset, len)` handles one range and
    /// returns the bytes it looked at and those it copied.
    pub async fn pass<F, Fut>(
        &self,
        size: u64,
        rl: &mut RateLimit,
        retry_ignored: bool,
        mut chunk: F,
    ) -> Result<(), String>
    where
        F: FnMut(u64, u64) -> Fut,
        Fut: Future<Output = Result<(u64, u64), CopyError>>,
    {
        let core = &self.core;
        core.set_len(size);
        let mut offset = 0;
        // An ignored error lets the pass go on, and the job still ends with it
        // (QEMU's stream); `retry_ignored` retries the range instead (its commit).
        let mut ignored: Option<String> = None;
        while offset < size {
            core.pause_point(false)
                .await
                .map_err(|_| CANCELLED.to_string())?;
            let want = (size - offset).min(CHUNK);
            let (n, copied) = match chunk(offset, want).await {
                Ok(v) => v,
                Err(e) => {
                    let message = e.message.clone();
                    if self.on_error(e).await? {
                        continue;
                    }
                    if retry_ignored {
                        // Not in a tight loop while the error lasts.
                        core.sleep(IGNORED_RETRY).await;
                        continue;
                    }
                    ignored.get_or_insert(message);
                    (want, 0)
                }
            };
            offset += n;
            core.progress(n);
            self.throttle(rl, copied).await;
        }
        ignored.map_or(Ok(()), Err)
    }
}
