use crate::aio::iovec::{AlignedBuf, IoVec};
use crate::aio::uring::block_on;
use crate::graph::Graph;
use crate::node::Node;
use crate::options::BlockdevOptions;
use crate::perm::Perm;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

const SIZE: u64 = 1 << 20;

fn image(tag: &str, fill: u8) -> PathBuf {
    let path = std::env::temp_dir().join(format!("vubd-cbw-{tag}-{}", std::process::id()));
    std::fs::write(&path, vec![fill; SIZE as usize]).unwrap();
    path
}

fn add(g: &mut Graph, v: Value) -> crate::Result<Arc<Node>> {
    g.add(&BlockdevOptions::from_json(&v).unwrap())
}

fn buf(len: u64, fill: u8) -> IoVec {
    let b = Arc::new(AlignedBuf::zeroed(len as usize, 4096));
    let v = IoVec::from_buf(b);
    v.copy_from_slice(0, &vec![fill; len as usize]);
    v
}

fn bytes(v: &IoVec) -> Vec<u8> {
    let mut out = vec![0; v.len() as usize];
    v.copy_to_slice(0, &mut out);
    out
}

/// A source full of 0xaa, a target of 0x00, the filter and a snapshot-access node.
fn setup(tag: &str) -> (Graph, Arc<Node>, Arc<Node>, Vec<PathBuf>) {
    let (src, tgt) = (
        image(&format!("{tag}-s"), 0xaa),
        image(&format!("{tag}-t"), 0),
    );
    let mut g = Graph::new();
    add(
        &mut g,
        json!({"driver": "file", "node-name": "src", "filename": src.to_str().unwrap()}),
    )
    .unwrap();
    add(
        &mut g,
        json!({"driver": "file", "node-name": "tgt", "filename": tgt.to_str().unwrap()}),
    )
    .unwrap();
    let cbw = add(
        &mut g,
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
               "target": "tgt"}),
    )
    .unwrap();
    let acc = add(
        &mut g,
        json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw",
               "discard": "unmap"}),
    )
    .unwrap();
    (g, cbw, acc, vec![src, tgt])
}

#[test]
fn writes_copy_old_data_first_and_the_snapshot_keeps_it() {
    let (g, cbw, acc, paths) = setup("view");
    let (c, a) = (cbw.clone(), acc.clone());
    let tgt = g.get("tgt").unwrap();
    let src = g.get("src").unwrap();
    block_on(async move {
        // A 4 KiB write in the second cluster: that cluster's old data goes first.
        c.write(65536 + 4096, buf(4096, 0x11), false).await.unwrap();
        c.write_zeroes(3 * 65536, 65536, false, false)
            .await
            .unwrap();
        let t = buf(SIZE, 0);
        tgt.read(0, t.clone()).await.unwrap();
        let t = bytes(&t);
        assert!(t[65536..131072].iter().all(|b| *b == 0xaa));
        assert!(t[3 * 65536..4 * 65536].iter().all(|b| *b == 0xaa));
        assert!(
            t[..65536].iter().all(|b| *b == 0),
            "untouched cluster copied"
        );
        // The source has the new data; the snapshot, through the access node, the
        // old data everywhere.
        let s = buf(SIZE, 0);
        src.read(0, s.clone()).await.unwrap();
        let s = bytes(&s);
        assert!(s[65536 + 4096..65536 + 8192].iter().all(|b| *b == 0x11));
        let v = buf(SIZE, 0);
        a.read(0, v.clone()).await.unwrap();
        assert!(bytes(&v).iter().all(|b| *b == 0xaa), "snapshot changed");
        // The snapshot is not writable; a discarded area can no longer be read.
        assert!(a.write(0, buf(512, 1), false).await.is_err());
        a.discard(0, 65536).await.unwrap();
        let e = a.read(0, buf(512, 0)).await.unwrap_err();
        assert_eq!(e.errno(), libc::EACCES);
        a.read(65536, buf(512, 0)).await.unwrap();
        // The copy state shared with a backup job: two clusters copied, one
        // discarded; copying everything leaves the target equal to the old disk
        // (but for the discarded cluster).
        let bcs = c.driver().block_copy().unwrap();
        assert_eq!(bcs.copied(), 2 * 65536);
        assert_eq!(bcs.remaining(), SIZE - 3 * 65536);
        bcs.copy(0, SIZE, None).await.unwrap();
        assert_eq!(bcs.remaining(), 0);
        let t = buf(SIZE, 0);
        tgt.read(0, t.clone()).await.unwrap();
        let t = bytes(&t);
        assert!(t[65536..].iter().all(|b| *b == 0xaa));
    });
    drop((g, cbw, acc));
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn permissions_and_options() {
    let (mut g, cbw, _acc, paths) = setup("perm");
    let src = g.get("src").unwrap();
    // The target is written, shared but for resize.
    let edges = cbw.children();
    assert_eq!(edges[1].perm(), Perm::WRITE);
    // A writer of the filter keeps other writers off the source.
    let _u = g
        .attach_user(
            crate::edge::Parent::Backend(None),
            "root",
            &cbw,
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        )
        .unwrap();
    assert!(edges[0]
        .perm()
        .contains(Perm::CONSISTENT_READ | Perm::WRITE));
    let e = g
        .attach_user(
            crate::edge::Parent::Backend(None),
            "root",
            &src,
            Perm::WRITE,
            Perm::ALL,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("unshared by node 'cbw'"), "{e}");
    let err = |g: &mut Graph, v: Value| add(g, v).unwrap_err().to_string();
    assert_eq!(
        err(
            &mut g,
            json!({"driver": "copy-before-write", "node-name": "c2", "file": "src",
                   "target": "tgt", "bitmap": {"node": "nosuch", "name": "b"}})
        ),
        "Node 'nosuch' not found"
    );
    assert!(
        BlockdevOptions::from_json(&json!({"driver": "copy-before-write",
        "file": "src", "target": "tgt", "on-cbw-error": "sometimes"}))
        .is_err()
    );
    let o = BlockdevOptions::from_json(&json!({"driver": "copy-before-write",
        "file": "a", "target": "b", "on-cbw-error": "break-snapshot", "cbw-timeout": 5}))
    .unwrap();
    assert_eq!(BlockdevOptions::from_json(&o.to_json()).unwrap(), o);
    assert_eq!(o.references(), vec!["a", "b"]);
    drop((g, cbw));
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}
