//! The `null-co` driver: a device of a given size that stores nothing. Reads return
//! zeroes with `read-zeroes=on` (else the buffer is left as it is); every request
//! optionally completes after `latency-ns`.

use crate::aio::iovec::IoVec;
use crate::aio::{uring, LocalBoxFuture};
use crate::driver::Driver;
use crate::error::Result;

mod options;

pub use options::{NullOptions, NULL_DEFAULT_SIZE};

/// The table row of `null-co` and `null-aio`.
pub(crate) const ENTRY: super::DriverEntry = super::DriverEntry {
    names: &["null-co", "null-aio"],
    kind: super::Kind::Protocol,
    parse: options::parse,
    create: None,
    reopen_mutable: &[],
};

pub struct NullDriver {
    opts: NullOptions,
}

/// A request that is done at once. Zero-sized, so boxing it allocates nothing: without
/// `latency-ns` the driver's requests cost no allocation of their own.
struct Done;

impl std::future::Future for Done {
    type Output = Result<()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl NullDriver {
    pub fn new(opts: NullOptions) -> Self {
        NullDriver { opts }
    }

    /// A request that does nothing but wait for `latency-ns`.
    fn complete(&self) -> LocalBoxFuture<'_, Result<()>> {
        if self.opts.latency_ns == 0 {
            return Box::pin(Done);
        }
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    async fn delay(&self) {
        if self.opts.latency_ns > 0 {
            uring::sleep_ns(self.opts.latency_ns).await;
        }
    }
}

impl Driver for NullDriver {
    fn driver_name(&self) -> &'static str {
        if self.opts.aio {
            "null-aio"
        } else {
            "null-co"
        }
    }

    fn size(&self) -> u64 {
        self.opts.size
    }

    fn filename(&self) -> String {
        format!("{}://", self.driver_name())
    }

    fn supports_fua(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, _offset: u64, iov: IoVec) -> LocalBoxFuture<'a, Result<()>> {
        if !self.opts.read_zeroes {
            return self.complete();
        }
        Box::pin(async move {
            self.delay().await;
            if self.opts.read_zeroes {
                iov.fill_zero();
            }
            Ok(())
        })
    }

    fn write<'a>(
        &'a self,
        _offset: u64,
        _iov: IoVec,
        _fua: bool,
    ) -> LocalBoxFuture<'a, Result<()>> {
        self.complete()
    }

    fn flush(&self) -> LocalBoxFuture<'_, Result<()>> {
        self.complete()
    }

    fn discard(&self, _offset: u64, _len: u64) -> LocalBoxFuture<'_, Result<()>> {
        self.complete()
    }

    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
    ) -> LocalBoxFuture<'_, Result<()>> {
        self.complete()
    }
}
