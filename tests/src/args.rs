//! Building daemon command lines (vubd and qemu-storage-daemon share the syntax).

use crate::image::TempImage;
use std::path::Path;

/// A command line under construction: `--object`, `--blockdev`, `--export` options.
#[derive(Debug, Clone, Default)]
pub struct DaemonArgs {
    args: Vec<String>,
}

impl DaemonArgs {
    pub fn new() -> DaemonArgs {
        DaemonArgs::default()
    }

    /// `--object iothread,id=<id>`
    pub fn iothread(self, id: &str) -> DaemonArgs {
        self.object(&format!("iothread,id={id}"))
    }

    pub fn object(mut self, opts: &str) -> DaemonArgs {
        self.args.push("--object".into());
        self.args.push(opts.into());
        self
    }

    pub fn blockdev(mut self, opts: &str) -> DaemonArgs {
        self.args.push("--blockdev".into());
        self.args.push(opts.into());
        self
    }

    pub fn export(mut self, opts: &str) -> DaemonArgs {
        self.args.push("--export".into());
        self.args.push(opts.into());
        self
    }

    /// A QMP monitor on the UNIX socket `path` (`--chardev socket,id=m,...,server=on,
    /// wait=off --monitor chardev=m`).
    pub fn monitor(self, path: &Path) -> DaemonArgs {
        self.arg("--chardev")
            .arg(&format!(
                "socket,id=m,path={},server=on,wait=off",
                path.display()
            ))
            .arg("--monitor")
            .arg("chardev=m")
    }

    /// Any other argument.
    pub fn arg(mut self, a: &str) -> DaemonArgs {
        self.args.push(a.into());
        self
    }

    /// `--blockdev driver=file,node-name=<file_node>,filename=<img>,cache.direct=off<extra>`
    /// and `--blockdev driver=raw,node-name=<node>,file=<file_node><raw_extra>`.
    /// `extra`/`raw_extra` start with a comma when non-empty.
    pub fn file_raw(self, node: &str, img: &TempImage, extra: &str, raw_extra: &str) -> Self {
        self.file_raw_path(node, img.path(), extra, raw_extra)
    }

    pub fn file_raw_path(self, node: &str, img: &Path, extra: &str, raw_extra: &str) -> Self {
        let file_node = format!("{node}-file");
        let extra = if extra.contains("cache.direct=") {
            extra.to_string()
        } else {
            format!(",cache.direct=off{extra}")
        };
        self.blockdev(&format!(
            "driver=file,node-name={file_node},filename={}{extra}",
            img.display()
        ))
        .blockdev(&format!(
            "driver=raw,node-name={node},file={file_node}{raw_extra}"
        ))
    }

    /// `--export type=vhost-user-blk,id=<node>-exp,node-name=<node>,addr.type=unix,
    /// addr.path=<sock><extra>`; `extra` starts with a comma when non-empty.
    pub fn vhost_user_blk(self, node: &str, sock: &Path, extra: &str) -> DaemonArgs {
        self.export(&format!(
            "type=vhost-user-blk,id={node}-exp,node-name={node},addr.type=unix,addr.path={}{extra}",
            sock.display()
        ))
    }

    pub fn build(self) -> Vec<String> {
        self.args
    }
}

/// The usual test setup: one writable export `disk0` of `img` on `sock` (1 iothread,
/// `num-queues` as given). `file_extra`/`export_extra` are appended to the file blockdev and
/// the export options (each starting with a comma).
pub fn simple_file_export(
    img: &TempImage,
    sock: &Path,
    num_queues: usize,
    file_extra: &str,
    export_extra: &str,
) -> Vec<String> {
    DaemonArgs::new()
        .iothread("io0")
        .file_raw("disk0", img, file_extra, "")
        .vhost_user_blk(
            "disk0",
            sock,
            &format!(",writable=on,num-queues={num_queues},iothread=io0{export_extra}"),
        )
        .build()
}
