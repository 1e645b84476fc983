//! The accounting of an NBD export's requests: the export's `query-blockstats`
//! statistics (its backend's [`IoStats`], kept as the vhost-user-blk export keeps
//! them) and its `--metrics` request counters.
//!
//! A request that runs is accounted on the iothread that runs it: [`Started::new`]
//! when its task begins, [`Started::finish`] when its reply is ready. Its latency is
//! the one [`IoStats::done`] measured (loop-pass clock), so no clock is read for it.
//! A request refused before it runs is accounted with [`refused`]: as invalid when the
//! client asked for something wrong (out of range, a read-only export, bad flags, too
//! long). Its reply comes from the iothread as well, so these counts too go to the
//! iothread's shard (only a refusal that ends the connection, or one while the export
//! goes away, is counted by the connection's thread). Each costs a few relaxed adds
//! on per-thread shards and takes no lock.

use super::proto::*;
use super::NbdShared;
use crate::metrics::counters::RequestKind;
use blocklayer::aio::clock;
use blocklayer::stats::{Acct, IoKind, IoStats};

/// The metrics kind of an NBD command.
pub fn request_kind(cmd: u16) -> RequestKind {
    match cmd {
        CMD_READ => RequestKind::Read,
        CMD_WRITE => RequestKind::Write,
        CMD_FLUSH => RequestKind::Flush,
        CMD_TRIM => RequestKind::Discard,
        CMD_WRITE_ZEROES => RequestKind::WriteZeroes,
        CMD_BLOCK_STATUS => RequestKind::BlockStatus,
        _ => RequestKind::Other,
    }
}

/// The `query-blockstats` kind of an NBD command: write-zeroes counts as a write and
/// trim as an unmap (as for vhost-user-blk); block status and unknown commands are
/// not accounted there.
pub fn io_kind(cmd: u16) -> Option<IoKind> {
    match cmd {
        CMD_READ => Some(IoKind::Read),
        CMD_WRITE | CMD_WRITE_ZEROES => Some(IoKind::Write),
        CMD_FLUSH => Some(IoKind::Flush),
        CMD_TRIM => Some(IoKind::Unmap),
        _ => None,
    }
}

/// How a request's latency is measured.
enum Clock {
    /// By the export's statistics.
    Stats(Acct),
    /// Block status, which has none: [`clock::now_ns`] at the start.
    Plain(u64),
}

/// A request being accounted.
pub struct Started {
    kind: RequestKind,
    clock: Clock,
    /// The byte after a write's range (`wr_highest_offset`), else 0.
    end: u64,
}

impl Started {
    /// Starts accounting `req` (a request that passed the checks), at the time of
    /// the current loop pass.
    pub fn new(req: &Request) -> Started {
        let len = u64::from(req.len);
        let kind = request_kind(req.kind);
        let clock = match io_kind(req.kind) {
            Some(k) => Clock::Stats(IoStats::start(k, if k == IoKind::Flush { 0 } else { len })),
            None => Clock::Plain(clock::now_ns()),
        };
        let end = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            req.offset.saturating_add(len)
        } else {
            0
        };
        Started { kind, clock, end }
    }

    /// Accounts the request's end.
    pub fn finish(self, export: &NbdShared, ok: bool) {
        let counters = &export.counters;
        match self.clock {
            Clock::Stats(acct) => {
                let bytes = acct.bytes();
                let latency = export.blk.stats().done(acct, ok, self.end);
                counters.record(self.kind, bytes, ok, latency);
            }
            Clock::Plain(start) => {
                let latency = clock::now_ns().saturating_sub(start);
                counters.record(self.kind, 0, ok, latency);
            }
        }
    }
}

/// Accounts a request answered with an error before it ran: `invalid` if the client
/// asked for something the export refuses (else the connection or the export went
/// away, which only the metrics count as an error).
pub fn refused(export: &NbdShared, req: &Request, invalid: bool) {
    if invalid {
        if let Some(k) = io_kind(req.kind) {
            export.blk.stats().invalid(k);
        }
    }
    export.counters.record(request_kind(req.kind), 0, false, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_map_to_the_kinds_of_vhost_user_blk() {
        assert_eq!(request_kind(CMD_TRIM), RequestKind::Discard);
        assert_eq!(request_kind(CMD_BLOCK_STATUS), RequestKind::BlockStatus);
        assert_eq!(request_kind(99), RequestKind::Other);
        assert_eq!(io_kind(CMD_WRITE_ZEROES), Some(IoKind::Write));
        assert_eq!(io_kind(CMD_TRIM), Some(IoKind::Unmap));
        assert_eq!(io_kind(CMD_BLOCK_STATUS), None);
        assert_eq!(io_kind(CMD_DISC), None);
    }
}
