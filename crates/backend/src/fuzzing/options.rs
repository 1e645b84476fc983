//! `keyval`: option parsing, from the text of one option to a checked configuration.
//!
//! The first byte picks the entry point, the second a kind of item; the rest is the
//! text (invalid UTF-8 is replaced, as a command line from the OS would not be, but
//! the parsers only ever see `&str`):
//!
//! | byte 0 % 4 | entry point |
//! |------------|-------------|
//! | 0 | `keyval::parse_option` (keyval or JSON) with the kind's implied key, then `DaemonConfig::add_item` |
//! | 1 | `cli::parse_args` on the text split at newlines (`--config` arguments dropped: they read files) |
//! | 2 | `DaemonConfig::from_toml_str`, then `validate` |
//! | 3 | QMP arguments: `serde_json`, then the kind's `from_qmp` (`block-export-add`, `object-add`, `blockdev-add`) |

use crate::cli;
use crate::config::{DaemonConfig, ExportConfig, ItemKind, ObjectConfig};
use crate::keyval;
use blocklayer::options::BlockdevOptions;
use std::path::Path;

const KINDS: [ItemKind; 5] = [
    ItemKind::Chardev,
    ItemKind::Monitor,
    ItemKind::Object,
    ItemKind::Blockdev,
    ItemKind::Export,
];

/// Runs one input.
pub fn keyval(data: &[u8]) {
    let (Some(&mode), Some(&kind)) = (data.first(), data.get(1)) else {
        return;
    };
    let kind = KINDS[usize::from(kind) % KINDS.len()];
    let text = String::from_utf8_lossy(&data[2..]);
    match mode % 4 {
        0 => {
            if let Ok(v) = keyval::parse_option(&text, Some(kind.implied_key())) {
                assert!(v.is_object(), "{v}");
                let mut config = DaemonConfig::default();
                if config.add_item(kind, &v).is_ok() {
                    let _ = config.validate();
                }
            }
        }
        1 => {
            let mut args = Vec::new();
            let mut lines = text.split('\n');
            while let Some(arg) = lines.next() {
                if arg.starts_with("--config") {
                    // `--config FILE` reads a file; leave the file (the next
                    // argument) out too.
                    if !arg.contains('=') {
                        lines.next();
                    }
                    continue;
                }
                args.push(arg.to_string());
            }
            let _ = cli::parse_args(args);
        }
        2 => {
            if let Ok(config) = DaemonConfig::from_toml_str(&text, Path::new("fuzz.toml")) {
                let _ = config.validate();
            }
        }
        _ => {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                return;
            };
            match kind {
                ItemKind::Export => drop(ExportConfig::from_qmp(&v)),
                ItemKind::Object => drop(ObjectConfig::from_qmp(&v)),
                _ => drop(BlockdevOptions::from_qmp(&v)),
            }
        }
    }
}

/// Seed inputs: command-line options, configuration files and QMP arguments.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let kind = |k: ItemKind| KINDS.iter().position(|&x| x == k).unwrap_or(0) as u8;
    let mut out = Vec::new();
    let mut add = |name: &str, mode: u8, k: ItemKind, text: &str| {
        let mut v = vec![mode, kind(k)];
        v.extend_from_slice(text.as_bytes());
        out.push((name.to_string(), v));
    };
    use ItemKind::*;
    add(
        "blockdev-file",
        0,
        Blockdev,
        "file,node-name=file0,filename=disk.img,cache.direct=on,aio=io_uring",
    );
    add(
        "blockdev-raw-inline",
        0,
        Blockdev,
        "driver=raw,node-name=disk0,file.driver=file,file.filename=a,,b.img,offset=4096,size=1M",
    );
    add("blockdev-qcow2", 0, Blockdev, "driver=qcow2,node-name=q,file=f,backing=null,l2-cache-size=1M,discard=unmap,detect-zeroes=unmap");
    add(
        "blockdev-null",
        0,
        Blockdev,
        "null-co,node-name=n,size=1G,read-zeroes=on,latency-ns=100",
    );
    add("blockdev-blkdebug", 0, Blockdev, "driver=blkdebug,node-name=d,image=n,inject-error.0.event=pwritev,inject-error.0.errno=28,inject-error.0.once=on");
    add(
        "blockdev-json",
        0,
        Blockdev,
        r#"{"driver":"raw","node-name":"r","file":{"driver":"null-co","size":1048576}}"#,
    );
    add("export", 0, Export, "vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=/tmp/x.sock,writable=on,num-queues=4,iothread.0=io0,iothread.1=io1,logical-block-size=4096,serial=disk0,queue-size=256");
    add("export-werror", 0, Export, "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=s,werror=stop,rerror=stop,write-cache=off,fixed-iothread=on,iothread=io0");
    add(
        "object-iothread",
        0,
        Object,
        "iothread,id=io0,poll-max-ns=32768,poll-grow=2,poll-shrink=0,aio-max-batch=0",
    );
    add(
        "chardev",
        0,
        Chardev,
        "socket,id=mon0,path=/tmp/qmp.sock,server=on,wait=off",
    );
    add("monitor", 0, Monitor, "chardev=mon0,mode=control,pretty=on");
    add("keyval-array-gap", 0, Export, "iothread.0=a,iothread.2=b");
    add(
        "keyval-inconsistent",
        0,
        Blockdev,
        "file.driver=file,file=x",
    );
    add(
        "keyval-deep",
        0,
        Blockdev,
        "a.b.c.d.e.f.g.h.i.j.k.l.m.n=1,,2,help",
    );
    add("json-not-object", 0, Object, "[1,2,3]");
    add(
        "cli-full",
        1,
        Blockdev,
        "--object\niothread,id=io0\n--blockdev\ndriver=file,node-name=file0,filename=disk.img\n--blockdev\ndriver=raw,node-name=disk0,file=file0\n--export\ntype=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=/tmp/vubd.sock,iothread=io0\n--chardev\nsocket,id=m,path=/tmp/m.sock,server=on,wait=off\n--monitor\nchardev=m\n--pidfile=/tmp/p",
    );
    add(
        "cli-errors",
        1,
        Blockdev,
        "--blockdev\n--export=\n-T\n--nbd-server\n-V\n--help=x\nfoo",
    );
    add(
        "toml",
        2,
        Blockdev,
        "pidfile = \"/tmp/vubd.pid\"\n[[object]]\nqom-type = \"iothread\"\nid = \"io0\"\n[[blockdev]]\ndriver = \"file\"\nnode-name = \"file0\"\nfilename = \"disk.img\"\ncache = { direct = true }\n[[blockdev]]\ndriver = \"raw\"\nnode-name = \"disk0\"\nfile = \"file0\"\n[[export]]\ntype = \"vhost-user-blk\"\nid = \"exp0\"\nnode-name = \"disk0\"\naddr = { type = \"unix\", path = \"/tmp/vubd.sock\" }\nwritable = true\nnum-queues = 2\niothread = [\"io0\"]\n",
    );
    add(
        "toml-bad",
        2,
        Blockdev,
        "[[export]]\nid = 1\n[[nope]]\nx = [1, {a = 2}]\n",
    );
    add(
        "qmp-blockdev",
        3,
        Blockdev,
        r#"{"driver":"qcow2","node-name":"q","file":{"driver":"file","filename":"a.qcow2"},"backing":null,"cache":{"direct":true}}"#,
    );
    add(
        "qmp-export",
        3,
        Export,
        r#"{"type":"vhost-user-blk","id":"e","node-name":"n","addr":{"type":"unix","path":"/tmp/s"},"writable":true,"num-queues":2,"iothread":["a","b"]}"#,
    );
    add(
        "qmp-object",
        3,
        Object,
        r#"{"qom-type":"iothread","id":"io1","poll-max-ns":0}"#,
    );
    add(
        "qmp-wrong-types",
        3,
        Export,
        r#"{"type":"vhost-user-blk","id":5,"node-name":null,"addr":"x","num-queues":-1}"#,
    );
    out
}
