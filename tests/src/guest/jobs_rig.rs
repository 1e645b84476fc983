//! What the guest job tests (guest_jobs.rs, guest_mirror.rs) share: the daemon under
//! test (vubd, or qemu-storage-daemon with `VUBD_JOBS_DAEMON=qsd`) with an iothread
//! `io0`, the guest's disk exported from a node on it, a raw reference disk
//! (`ref.raw`, what the guest copies its disk onto to show what it sees) exported
//! beside it, the daemon's QMP monitor, and a guest booted with both disks whose
//! disk cache is write-back.

use super::{Guest, GuestOpts, CMD_TIMEOUT};
use crate::image::TempDir;
use crate::{Daemon, DaemonArgs, Qmp};
use std::path::PathBuf;

pub struct JobsRig {
    /// "vubd" or "qemu-storage-daemon".
    pub daemon_name: &'static str,
    pub daemon: Daemon,
    pub qmp: Qmp,
    pub guest: Guest,
    pub ref_raw: PathBuf,
}

/// `--blockdev` options of a file node over `dir/file` (`cache.direct=off`).
pub fn file_node(dir: &TempDir, node: &str, file: &str) -> String {
    format!(
        "driver=file,node-name={node},filename={},cache.direct=off",
        dir.join(file).display()
    )
}

/// Starts the daemon with `blockdevs` (which must define `disk_node`), exports
/// `disk_node` as the guest's first disk (`disk`, on `io0`) and a new `ref.raw` of
/// `size` bytes as its second (`ref`), and boots guest `name` on them.
pub fn start(
    name: &str,
    dir: &TempDir,
    size: u64,
    blockdevs: &[String],
    disk_node: &str,
) -> JobsRig {
    let (daemon_name, bin) = crate::jobs_daemon();
    let ref_raw = dir.join("ref.raw");
    std::fs::File::create(&ref_raw)
        .and_then(|f| f.set_len(size))
        .expect("create ref.raw");
    let (sock, ref_sock, mon) = (
        dir.join("disk.sock"),
        dir.join("ref.sock"),
        dir.join("qmp.sock"),
    );
    let mut args = DaemonArgs::new().monitor(&mon).iothread("io0");
    for b in blockdevs {
        args = args.blockdev(b);
    }
    let args = args
        .blockdev(&format!(
            "driver=file,node-name=ref-file,filename={}",
            ref_raw.display()
        ))
        .blockdev("driver=raw,node-name=ref,file=ref-file")
        .export(&format!(
            "type=vhost-user-blk,id=disk,node-name={disk_node},addr.type=unix,addr.path={},\
             writable=on,num-queues=1,iothread=io0",
            sock.display()
        ))
        .export(&format!(
            "type=vhost-user-blk,id=ref,node-name=ref,addr.type=unix,addr.path={},\
             writable=on,num-queues=1",
            ref_sock.display()
        ))
        .build();
    let daemon = Daemon::start_bin(&bin, &args);
    let qmp = Qmp::connect(&mon);
    let mut guest = Guest::boot(&GuestOpts::new(name).disk(&sock, 1).disk(&ref_sock, 1));
    // qemu-storage-daemon 7.2 tells the guest its cache is write-through (wce=0) while
    // it caches writes itself (the export's BlockBackend has its write cache on), so
    // Linux would never send it a FLUSH. Switched to write-back (vubd's default), the
    // guest's fsyncs reach the daemon.
    guest.check("echo 'write back' > /sys/block/vda/cache_type", CMD_TIMEOUT);
    assert_eq!(
        guest.read_file("/sys/block/vda/queue/write_cache"),
        "write back"
    );
    JobsRig {
        daemon_name,
        daemon,
        qmp,
        guest,
        ref_raw,
    }
}
