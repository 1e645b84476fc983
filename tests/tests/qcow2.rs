//! qcow2 images that qemu-img and qemu-io make, served by vubd (read-only so far) and
//! read through libblkio: every byte equals `qemu-img convert -O raw`. Covers cluster
//! sizes, compat 0.10 and 1.1, extended L2 (subclusters), zero and discarded ranges,
//! compressed clusters (zlib and zstd), unaligned writes, and a backing chain of three
//! with a raw base, opened from the image headers.

use std::path::{Path, PathBuf};
use std::process::Command;
use vubd_tests::{assert_same_data, Client, ClientOptions, Daemon, DaemonArgs, TempDir, MIB};

use vubd_tests::tools::{qemu_img, qemu_io};

/// What qemu-img says the guest sees.
fn reference(img: &Path, dir: &TempDir, tag: &str) -> Vec<u8> {
    let raw = dir.join(&format!("{tag}.ref.raw"));
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::read(&raw).unwrap()
}

/// Serves `img` read-only as qcow2 (backing chain from the header) and reads it all.
fn read_through_vubd(img: &Path, dir: &TempDir, tag: &str) -> Vec<u8> {
    let sock = dir.join(&format!("{tag}.sock"));
    let args = DaemonArgs::new()
        .blockdev(&format!(
            "driver=file,node-name=f,filename={},read-only=on",
            img.display()
        ))
        .blockdev("driver=qcow2,node-name=q,file=f,read-only=on")
        .export(&format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={}",
            sock.display()
        ))
        .build();
    let _daemon = Daemon::start(&args);
    let opts = ClientOptions {
        read_only: true,
        ..Default::default()
    };
    let mut c = Client::connect_with(&sock, &opts).expect("connect");
    let cap = c.capacity();
    let mut out = Vec::with_capacity(cap as usize);
    let chunk = 256 * 1024;
    let mut pos = 0u64;
    while pos < cap {
        let n = (cap - pos).min(chunk) as usize;
        out.extend(c.q().read(pos, n).expect("read"));
        pos += n as u64;
    }
    out
}

fn check(img: &Path, dir: &TempDir, tag: &str) {
    let want = reference(img, dir, tag);
    let got = read_through_vubd(img, dir, tag);
    assert_eq!(got.len(), want.len(), "{tag}: size");
    assert_same_data(tag, &got, &want);
}

/// A mix of writes qemu-io makes: patterns, unaligned ranges, zeroes, discards,
/// compressed clusters.
fn scribble(img: &Path, cluster: u64, compressed: bool) {
    let c = cluster;
    let cmds = [
        format!("write -P 0xa1 0 {}", 3 * c),
        format!("write -P 0xb2 {} 7777", c + 123),
        format!("write -z {} {}", 5 * c, 2 * c),
        format!("write -P 0xc3 {} {}", 8 * c, 4 * c),
        format!("discard {} {}", 9 * c, 2 * c),
        format!("write -z -u {} {}", 13 * c, c),
        format!("write -c -P 0xd4 {} {}", 16 * c, 2 * c),
        format!("write -P 0xe5 {} 1000", 20 * c + 333),
    ];
    // qemu-io writes compressed clusters only of 4 KiB and more, and only into
    // unallocated clusters.
    let refs: Vec<&str> = cmds
        .iter()
        .map(String::as_str)
        .filter(|c| (compressed && cluster >= 4096) || !c.starts_with("write -c"))
        .collect();
    qemu_io(img, "qcow2", &refs);
}

#[test]
fn qemu_img_images_read_back_identically() {
    let dir = TempDir::new("vubd-qcow2-read");
    let cases: &[(&str, &str, u64)] = &[
        ("default", "", 65536),
        ("c512", "cluster_size=512", 512),
        ("c2m", "cluster_size=2M", 2 * MIB),
        ("compat010", "compat=0.10", 65536),
        ("l2ext", "extended_l2=on,cluster_size=128k", 128 * 1024),
        ("rc1", "refcount_bits=1", 65536),
        ("rc64", "refcount_bits=64", 65536),
        ("zstd", "compression_type=zstd", 65536),
        ("lazy", "lazy_refcounts=on", 65536),
        ("prealloc", "preallocation=metadata", 65536),
    ];
    for (tag, opts, cluster) in cases {
        let img = dir.join(&format!("{tag}.qcow2"));
        let size = (24 * cluster).max(8 * MIB);
        let mut args = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let size_s = size.to_string();
        args.extend([img.to_str().unwrap(), size_s.as_str()]);
        qemu_img(&args);
        scribble(&img, *cluster, !opts.contains("preallocation"));
        check(&img, &dir, tag);
    }
}

#[test]
fn backing_chain_of_three_with_a_raw_base() {
    let dir = TempDir::new("vubd-qcow2-chain");
    let base: PathBuf = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-f", "raw", base.to_str().unwrap(), "16M"]);
    qemu_io(&base, "raw", &["write -P 0x11 0 16M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
        "16M",
    ]);
    qemu_io(&mid, "qcow2", &["write -P 0x22 1M 2M", "write -z 5M 1M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        mid.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "16M",
    ]);
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x33 2M 64k", "write -P 0x44 10M 12345"],
    );
    check(&top, &dir, "chain");
}

/// Serves `img` as a writable qcow2 export (`extra` appended to both node options)
/// and connects a libblkio client to it.
fn serve_writable(dir: &TempDir, img: &Path, tag: &str, extra: &str) -> (Daemon, Client) {
    let sock = dir.join(&format!("{tag}.sock"));
    let args = DaemonArgs::new()
        .blockdev(&format!(
            "driver=file,node-name=f,filename={}{extra}",
            img.display()
        ))
        .blockdev(&format!("driver=qcow2,node-name=q,file=f{extra}"))
        .export(&format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .build();
    let daemon = Daemon::start(&args);
    let client = Client::connect(&sock, 1);
    (daemon, client)
}

/// Random writes, zero writes and discards through vubd on a qcow2 image, checked
/// against a model; afterwards `qemu-img check` finds no errors or leaks and
/// `qemu-img compare` finds the image equal to the model.
fn random_writes(dir: &TempDir, tag: &str, create_opts: &[&str], backing: Option<&Path>) {
    let img = dir.join(&format!("{tag}.qcow2"));
    let size: u64 = 16 * MIB;
    let mut args = vec!["create", "-f", "qcow2"];
    args.extend(create_opts);
    let size_s = size.to_string();
    args.extend([img.to_str().unwrap(), size_s.as_str()]);
    qemu_img(&args);
    let mut model = match backing {
        Some(b) => std::fs::read(b).unwrap(),
        None => vec![0u8; size as usize],
    };
    model.resize(size as usize, 0);

    let (mut daemon, mut c) = serve_writable(dir, &img, tag, ",discard=unmap");
    let mut rng = vubd_tests::Rng::new(tag);
    for i in 0..300 {
        let sectors = size / 512;
        let len = rng.range(1, 257) * 512;
        let off = rng.range(0, sectors - len / 512) * 512;
        match rng.range(0, 10) {
            0 => {
                c.q()
                    .write_zeroes(off, len, blkio::ReqFlags::empty())
                    .unwrap_or_else(|e| panic!("{tag}: write zeroes #{i}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            1 if backing.is_none() => {
                // Discard may leave the data or zeroes: only whole clusters read as
                // zeroes afterwards; treat the range as unknown by rewriting it.
                c.q().discard(off, len).expect("discard");
                let data = rng.bytes(len as usize);
                c.q().write(off, &data).expect("write after discard");
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            _ => {
                let data = rng.bytes(len as usize);
                c.q()
                    .write(off, &data)
                    .unwrap_or_else(|e| panic!("{tag}: write #{i}: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        if i % 50 == 49 {
            c.q().flush().expect("flush");
        }
    }
    c.q().flush().expect("flush");
    let mut got = Vec::new();
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20) as usize;
        got.extend(c.q().read(pos, n).expect("read"));
        pos += n as u64;
    }
    assert_same_data(tag, &got, &model);
    drop(c);
    let st = daemon.terminate();
    assert_eq!(st.code(), Some(0), "{tag}: vubd exit");
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{tag}: qemu-img check:\n{text}");
    assert!(
        text.contains("No errors were found"),
        "{tag}: qemu-img check:\n{text}"
    );
    assert!(!text.contains("leaked"), "{tag}: qemu-img check:\n{text}");
    let raw = dir.join(&format!("{tag}.model.raw"));
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
}

#[test]
fn vubd_writes_pass_qemu_img_check_and_compare() {
    let dir = TempDir::new("vubd-qcow2-write");
    random_writes(&dir, "default", &[], None);
    random_writes(
        &dir,
        "l2ext",
        &["-o", "extended_l2=on,cluster_size=128k"],
        None,
    );
    random_writes(
        &dir,
        "compat010",
        &["-o", "compat=0.10,cluster_size=4k"],
        None,
    );
    random_writes(&dir, "rc1", &["-o", "refcount_bits=1"], None);
}

#[test]
fn vubd_writes_over_a_backing_file_copy_on_write() {
    let dir = TempDir::new("vubd-qcow2-cow");
    let base = dir.join("base.raw");
    qemu_img(&["create", "-f", "raw", base.to_str().unwrap(), "16M"]);
    qemu_io(&base, "raw", &["write -P 0x5a 0 16M"]);
    random_writes(
        &dir,
        "overlay",
        &["-b", base.to_str().unwrap(), "-F", "raw"],
        Some(&base),
    );
}

fn vubd_img(args: &[&str]) -> (i32, String) {
    let out = Command::new(vubd_tests::vubd_bin())
        .arg("img")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn qemu_img_info(img: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output", "json", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn vubd_img_create_info_check_map_agree_with_qemu_img() {
    let dir = TempDir::new("vubd-img");
    let cases: &[(&str, &[(&str, serde_json::Value)])] = &[
        ("", &[("cluster-size", serde_json::json!(65536))]),
        (
            "cluster_size=4k,refcount_bits=1",
            &[("cluster-size", serde_json::json!(4096))],
        ),
        ("compat=0.10", &[("cluster-size", serde_json::json!(65536))]),
        (
            "extended_l2=on,cluster_size=64k,lazy_refcounts=on",
            &[("cluster-size", serde_json::json!(65536))],
        ),
        ("preallocation=metadata", &[]),
        ("compression_type=zstd", &[]),
    ];
    for (i, (opts, expect)) in cases.iter().enumerate() {
        let img = dir.join(&format!("c{i}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([img.to_str().unwrap(), "32M"]);
        let (rc, out) = vubd_img(&args);
        assert_eq!(rc, 0, "vubd img create {opts}: {out}");
        qemu_img(&["check", img.to_str().unwrap()]);
        let info = qemu_img_info(&img);
        assert_eq!(info["virtual-size"], 32 * MIB, "{opts}: {info}");
        assert_eq!(info["format"], "qcow2");
        for (k, v) in *expect {
            assert_eq!(&info[*k], v, "{opts}: {k} in {info}");
        }
        let spec = &info["format-specific"]["data"];
        if opts.contains("compat=0.10") {
            assert_eq!(spec["compat"], "0.10");
        }
        if opts.contains("extended_l2=on") {
            assert_eq!(spec["extended-l2"], true, "{info}");
            assert_eq!(spec["lazy-refcounts"], true, "{info}");
        }
        if opts.contains("refcount_bits=1") {
            assert_eq!(spec["refcount-bits"], 1, "{info}");
        }
        if opts.contains("zstd") {
            assert_eq!(spec["compression-type"], "zstd", "{info}");
        }
        // qemu-io writes into it; vubd img check and map see what qemu-img sees.
        if !opts.contains("preallocation") {
            qemu_io(
                &img,
                "qcow2",
                &["write -P 7 0 128k", "write -P 9 1M 128k", "write -z 1M 64k"],
            );
        }
        let (rc, out) = vubd_img(&["check", img.to_str().unwrap()]);
        assert_eq!(rc, 0, "vubd img check {opts}: {out}");
        assert!(out.contains("No errors were found"), "{out}");
        let (rc, out) = vubd_img(&["map", "--output", "json", img.to_str().unwrap()]);
        assert_eq!(rc, 0, "{out}");
        let map: serde_json::Value = serde_json::from_str(&out).unwrap();
        let first = &map[0];
        assert_eq!(first["start"], 0);
        if !opts.contains("preallocation") {
            assert_eq!(first["kind"], "data", "{map}");
            assert!(first["length"].as_u64().unwrap() >= 128 * 1024, "{map}");
            // The zeroed clusters are zero clusters (v3) or deallocated (v2), and
            // the rest of the second write is data.
            let at = |off: u64| {
                map.as_array()
                    .unwrap()
                    .iter()
                    .find(|e| {
                        let s = e["start"].as_u64().unwrap();
                        s <= off && off < s + e["length"].as_u64().unwrap()
                    })
                    .map(|e| e["kind"].as_str().unwrap().to_string())
                    .unwrap()
            };
            assert!(["zero", "unallocated"].contains(&at(MIB).as_str()), "{map}");
            assert_eq!(at(MIB + 64 * 1024), "data", "{map}");
        }
    }
    // Errors are clear, with qemu-img check's exit codes kept for findings.
    let bad = dir.join("x.qcow2");
    let (rc, out) = vubd_img(&[
        "create",
        "-o",
        "cluster_size=3k",
        bad.to_str().unwrap(),
        "1M",
    ]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("cluster_size"), "{out}");
    assert!(!bad.exists(), "a refused image was created");
    let (rc, out) = vubd_img(&["info", dir.join("missing").to_str().unwrap()]);
    assert_eq!(rc, 1, "{out}");
}

/// Bytes the file takes on the host (st_blocks).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `qemu-img map --output=json` as (start, length, present, zero, data) per entry,
/// merged where the flags agree (host offsets left out: layouts may differ).
fn map_flags(img: &Path) -> Vec<(u64, u64, bool, bool, bool)> {
    let out = Command::new("qemu-img")
        .args(["map", "-U", "--output=json", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut m: Vec<(u64, u64, bool, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let f = |k: &str| e[k].as_bool().unwrap();
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let flags = (f("present"), f("zero"), f("data"));
        match m.last_mut() {
            Some(l) if (l.2, l.3, l.4) == flags && l.0 + l.1 == start => l.1 += len,
            _ => m.push((start, len, flags.0, flags.1, flags.2)),
        }
    }
    m
}

/// What a qcow2 image made with `mode` must look like: a clean check, the virtual
/// size, host space for the data only with falloc and full, data clusters mapped for
/// every mode but off, zeroes throughout; and the same map as qemu-img's own image
/// with that mode (`reference`).
fn check_preallocated(img: &Path, reference: &Path, mode: &str, size: u64, dir: &TempDir) {
    let tag = format!("{mode} ({})", img.display());
    qemu_img(&["check", "-U", img.to_str().unwrap()]);
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output", "json", img.to_str().unwrap()])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], size, "{tag}: {info}");
    let used = allocated_bytes(img);
    let theirs = allocated_bytes(reference);
    match mode {
        "falloc" | "full" => {
            assert!(used >= size, "{tag}: {used} bytes allocated");
            assert!(used < size + size / 16, "{tag}: {used} bytes allocated");
            assert!(theirs >= size, "qemu-img {mode}: {theirs}");
        }
        _ => {
            assert!(used < MIB, "{tag}: {used} bytes allocated");
            assert!(theirs < MIB, "qemu-img {mode}: {theirs}");
        }
    }
    let map = map_flags(img);
    let want = if mode == "off" {
        (0, size, false, true, false)
    } else {
        (0, size, true, mode == "metadata", true)
    };
    assert_eq!(map, [want], "{tag}: map");
    assert_eq!(
        map,
        map_flags(reference),
        "{tag}: map differs from qemu-img's"
    );
    // It reads as zeroes.
    let zero = dir.join("zero.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        zero.to_str().unwrap(),
        &size.to_string(),
    ]);
    qemu_img(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img.to_str().unwrap(),
        zero.to_str().unwrap(),
    ]);
}

#[test]
fn preallocation_modes_match_qemu_img() {
    let dir = TempDir::new("vubd-prealloc");
    let size = 48 * MIB;
    let size_s = size.to_string();
    for mode in ["off", "metadata", "falloc", "full"] {
        let ours = dir.join(&format!("{mode}.qcow2"));
        let theirs = dir.join(&format!("{mode}.qemu.qcow2"));
        let o = format!("preallocation={mode},cluster_size=64k");
        let (rc, out) = vubd_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &o,
            ours.to_str().unwrap(),
            &size_s,
        ]);
        assert_eq!(rc, 0, "vubd img create {o}: {out}");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            theirs.to_str().unwrap(),
            &size_s,
        ]);
        check_preallocated(&ours, &theirs, mode, size, &dir);
        // Served by vubd, it takes writes where the space is.
        let (mut daemon, mut c) = serve_writable(&dir, &ours, mode, "");
        let data = vec![0x5au8; 256 * 1024];
        c.q().write(size - MIB, &data).expect("write");
        c.q().flush().expect("flush");
        assert_same_data(mode, &c.q().read(size - MIB, data.len()).unwrap(), &data);
        drop(c);
        assert_eq!(daemon.terminate().code(), Some(0));
        qemu_img(&["check", ours.to_str().unwrap()]);
    }
    // Raw images: falloc and full take the whole size, off almost nothing; metadata is
    // refused as by qemu-img.
    for mode in ["off", "falloc", "full"] {
        let ours = dir.join(&format!("{mode}.raw"));
        let theirs = dir.join(&format!("{mode}.qemu.raw"));
        let o = format!("preallocation={mode}");
        let (rc, out) = vubd_img(&[
            "create",
            "-f",
            "raw",
            "-o",
            &o,
            ours.to_str().unwrap(),
            &size_s,
        ]);
        assert_eq!(rc, 0, "vubd img create -f raw {o}: {out}");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "raw",
            "-o",
            &o,
            theirs.to_str().unwrap(),
            &size_s,
        ]);
        assert_eq!(std::fs::metadata(&ours).unwrap().len(), size, "raw {mode}");
        let (used, want) = (allocated_bytes(&ours), allocated_bytes(&theirs));
        assert!(
            used.abs_diff(want) <= 64 * 1024,
            "raw {mode}: vubd allocated {used}, qemu-img {want}"
        );
        assert!(
            std::fs::read(&ours).unwrap().iter().all(|&b| b == 0),
            "raw {mode}"
        );
    }
    let bad = dir.join("metadata.raw");
    let (rc, out) = vubd_img(&[
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=metadata",
        bad.to_str().unwrap(),
        "1M",
    ]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("Unsupported preallocation mode: metadata"),
        "{out}"
    );
}

/// Runs a `blockdev-create` job to its end and dismisses it; panics with the job's
/// error if it failed.
fn create_job(q: &mut vubd_tests::Qmp, id: &str, options: serde_json::Value) {
    use serde_json::json;
    q.ok("blockdev-create", json!({"job-id": id, "options": options}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let jobs = q.ok("query-jobs", json!({}));
        let job = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no job {id} in {jobs}"));
        if job["status"] == "concluded" {
            assert!(job.get("error").is_none(), "job {id}: {job}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} hangs: {job}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    q.ok("job-dismiss", json!({"id": id}));
}

#[test]
fn blockdev_create_preallocates_through_the_block_layer() {
    use serde_json::json;
    let dir = TempDir::new("vubd-prealloc-qmp");
    let qs = dir.join("qmp.sock");
    let args = DaemonArgs::new().monitor(&qs).build();
    let mut daemon = Daemon::start(&args);
    let mut q = vubd_tests::Qmp::connect(&qs);
    let size = 40 * MIB;
    // driver=file: host files with each preallocation mode.
    for mode in ["off", "falloc", "full"] {
        let f = dir.join(&format!("{mode}.raw"));
        create_job(
            &mut q,
            &format!("raw-{mode}"),
            json!({"driver": "file", "filename": f.to_str().unwrap(), "size": size,
                   "preallocation": mode}),
        );
        assert_eq!(std::fs::metadata(&f).unwrap().len(), size);
        let used = allocated_bytes(&f);
        if mode == "off" {
            assert!(used < MIB, "file {mode}: {used}");
        } else {
            assert!(used >= size, "file {mode}: {used}");
        }
    }
    let e = q
        .execute(
            "blockdev-create",
            json!({"job-id": "bad", "options": {"driver": "file", "size": MIB,
                   "filename": dir.join("bad").to_str().unwrap(), "preallocation": "metadata"}}),
        )
        .unwrap_err();
    assert!(
        e.desc.contains("Unsupported preallocation mode: metadata"),
        "{}",
        e.desc
    );
    // driver=qcow2 on a file node: the data clusters are reserved through the file
    // node (fallocate through io_uring) or written with zeroes.
    for mode in ["off", "metadata", "falloc", "full"] {
        let img = dir.join(&format!("{mode}.qcow2"));
        let node = format!("f-{mode}");
        create_job(
            &mut q,
            &format!("file-{mode}"),
            json!({"driver": "file", "filename": img.to_str().unwrap(), "size": 0}),
        );
        q.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": node, "filename": img.to_str().unwrap()}),
        );
        create_job(
            &mut q,
            &format!("qcow2-{mode}"),
            json!({"driver": "qcow2", "file": node, "size": size, "preallocation": mode}),
        );
        let theirs = dir.join(&format!("{mode}.qemu.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("preallocation={mode}"),
            theirs.to_str().unwrap(),
            &size.to_string(),
        ]);
        check_preallocated(&img, &theirs, mode, size, &dir);
        q.ok("blockdev-del", json!({"node-name": node}));
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn blockdev_create_job_over_qmp_then_serve_the_new_image() {
    use serde_json::json;
    use std::time::Duration;
    let dir = TempDir::new("vubd-qcow2-create");
    let qs = dir.join("qmp.sock");
    let img = dir.join("new.qcow2");
    let args = DaemonArgs::new().monitor(&qs).build();
    let _daemon = Daemon::start(&args);
    let mut q = vubd_tests::Qmp::connect(&qs);
    // The host file, then the qcow2 format on it.
    q.ok(
        "blockdev-create",
        json!({"job-id": "j0", "options": {"driver": "file", "filename": img.to_str().unwrap(), "size": 0}}),
    );
    q.wait_job_concluded("j0", Duration::from_secs(60));
    q.ok("job-dismiss", json!({"id": "j0"}));
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f", "filename": img.to_str().unwrap()}),
    );
    q.ok(
        "blockdev-create",
        json!({"job-id": "j1", "options": {"driver": "qcow2", "file": "f", "size": 8 * MIB,
               "cluster-size": 4096, "version": "v3", "lazy-refcounts": true}}),
    );
    let mut statuses = Vec::new();
    while let Some(ev) = q.wait_event("JOB_STATUS_CHANGE", Duration::from_millis(500)) {
        if ev["data"]["id"] == "j1" {
            statuses.push(ev["data"]["status"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        statuses,
        ["created", "running", "waiting", "pending", "concluded"],
        "job states"
    );
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["id"], "j1");
    assert_eq!(jobs[0]["status"], "concluded");
    assert!(jobs[0].get("error").is_none(), "{jobs}");
    // QEMU's job-* commands answer an unknown id with GenericError (block-job-*
    // with DeviceNotActive); tests/qmp/test_jobs.py checks both against QSD.
    let e = q.execute("job-dismiss", json!({"id": "nope"})).unwrap_err();
    assert_eq!(e.class, "GenericError");
    assert_eq!(e.desc, "Job not found");
    q.ok("job-dismiss", json!({"id": "j1"}));
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    // A failing create: the job concludes with its error.
    q.ok(
        "blockdev-create",
        json!({"job-id": "j2", "options": {"driver": "qcow2", "file": "f", "size": MIB,
               "cluster-size": 3000}}),
    );
    let job = q.wait_job_concluded("j2", Duration::from_secs(60));
    assert!(job["error"].as_str().unwrap().contains("cluster"), "{job}");
    q.ok("job-dismiss", json!({"id": "j2"}));
    // Argument errors are QMP errors.
    let e = q
        .execute(
            "blockdev-create",
            json!({"job-id": "j3", "options": {"driver": "qcow2", "file": "f"}}),
        )
        .unwrap_err();
    assert_eq!(e.desc, "Parameter 'options.size' is missing");
    // The image that j1 made (j2 failed before writing) passes qemu-img check; serve
    // it and write through it.
    // vubd holds the image lock: qemu-img reads with -U (force-share).
    qemu_img(&["check", "-U", img.to_str().unwrap()]);
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output", "json", img.to_str().unwrap()])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 8 * MIB);
    assert_eq!(info["cluster-size"], 4096);
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "q", "file": "f"}),
    );
    let sock = dir.join("e.sock");
    q.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e", "node-name": "q", "writable": true,
               "addr": {"type": "unix", "path": sock.to_str().unwrap()}}),
    );
    let mut c = Client::connect(&sock, 1);
    let data = vec![0x6bu8; 256 * 1024];
    c.q().write(MIB, &data).expect("write");
    c.q().flush().expect("flush");
    assert_same_data("read back", &c.q().read(MIB, data.len()).unwrap(), &data);
}

/// What each 4 KiB block may hold after the daemon is killed (the host keeps its
/// page cache): the version of the last write acknowledged to the frontend, or one
/// in flight after it. Flushes matter for power loss, not for a process crash.
#[derive(Default, Clone)]
struct BlockState {
    flushed: u32,
    since: Vec<u32>,
}

fn version_data(block: u64, version: u32) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    if version == 0 {
        return v;
    }
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        let x = (block << 32 | u64::from(version)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// Which (block, version) a 4 KiB block's content was written as, for messages.
fn decode_block(data: &[u8]) -> String {
    if data.iter().all(|&b| b == 0) {
        return "zeroes".into();
    }
    let x = u64::from_le_bytes(data[..8].try_into().unwrap());
    // The inverse of the multiplier modulo 2^64 (Newton's iteration).
    let k: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut inv: u64 = k;
    for _ in 0..6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(k.wrapping_mul(inv)));
    }
    let v = x.wrapping_mul(inv);
    format!("block {} version {}", v >> 32, v & 0xffff_ffff)
}

/// Serves `img` writable with `extra` qcow2 options on a daemon of its own.
fn crash_daemon(img: &Path, sock: &Path) -> Daemon {
    let args = DaemonArgs::new()
        .blockdev(&format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .blockdev("driver=qcow2,node-name=q,file=f")
        .export(&format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .build();
    Daemon::start(&args)
}

/// `qemu-img check` of an image: (exit code, output).
fn qemu_img_check(img: &Path) -> (Option<i32>, String) {
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// Kills vubd with SIGKILL during random 4 KiB writes and flushes, 8 times on one
/// image (`create_opts` for qemu-img create), and checks after each kill that every
/// block holds its last acknowledged version, or one in flight at the kill: the L2
/// entries that map acknowledged writes reach the file before the write completes.
///
/// Strict refcounts (`lazy` false): qemu-img check finds no corruption right after
/// the kill, only leaks (the clusters reserved and not used yet), and the image has
/// the dirty bit for them if it reserved any. Lazy refcounts: the image has the dirty bit and its
/// refcounts may be stale, as QEMU leaves it. Either way opening it writable repairs
/// it, after which qemu-img check finds nothing. Each round writes into fresh clusters, so that every round
/// allocates up to the kill (the old binary, which kept new L2 entries in memory
/// until a flush, fails here).
fn sigkill_rounds(tag: &str, create_opts: &str, lazy: bool) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let dir = TempDir::new(&format!("vubd-qcow2-crash-{tag}"));
    let img = dir.join("crash.qcow2");
    const ROUNDS: u64 = 8;
    // Each round writes into fresh clusters (4 KiB blocks of 64 KiB clusters, in
    // random order), so that allocations go on until the kill.
    let region: u64 = 4096; // blocks of 4 KiB (16 MiB) written in a round
    let blocks = region * ROUNDS;
    let size = (blocks * 4096).to_string();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        create_opts,
        img.to_str().unwrap(),
        &size,
    ]);
    let state = Arc::new(Mutex::new(vec![BlockState::default(); blocks as usize]));
    let mut rng = vubd_tests::Rng::new(&format!("qcow2-crash-{tag}"));
    let mut next_version = 1u32;
    let (mut dirty_rounds, mut stale_rounds) = (0, 0);
    for round in 0..ROUNDS {
        let sock = dir.join(&format!("r{round}.sock"));
        let mut daemon = crash_daemon(&img, &sock);
        let st = state.clone();
        let seed = rng.next_u64();
        let first_version = next_version;
        let first_block = round * region;
        let flushes = Arc::new(AtomicU64::new(0));
        let done_flushes = flushes.clone();
        let writer = std::thread::spawn(move || {
            let mut c = Client::connect(&sock, 1);
            c.q().set_timeout(Duration::from_secs(3));
            let mut r = vubd_tests::Rng::with_seed(seed);
            let mut version = first_version;
            loop {
                // Rare flushes: what an acknowledged write needs to survive a
                // kill must not wait for one.
                if r.range(0, 128) == 0 {
                    c.q().flush().expect("flush");
                    // Flushes that made allocating writes stable (each write of
                    // a lazy round allocates, or rewrites a block it allocated).
                    if version > first_version {
                        done_flushes.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut s = st.lock().unwrap();
                    for b in s.iter_mut() {
                        if let Some(&last) = b.since.last() {
                            b.flushed = last;
                            b.since.clear();
                        }
                    }
                } else {
                    let block = first_block + r.range(0, region);
                    let data = version_data(block, version);
                    // Allowed from submission on: a write in flight at the crash
                    // may or may not have landed.
                    st.lock().unwrap()[block as usize].since.push(version);
                    c.q().write(block * 4096, &data).expect("write");
                    // Acknowledged: it must read back after a kill.
                    let mut s = st.lock().unwrap();
                    let b = &mut s[block as usize];
                    b.flushed = version;
                    b.since.clear();
                    drop(s);
                    version += 1;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300 + rng.range(0, 700)));
        daemon.kill();
        // The writer fails once the daemon is gone.
        assert!(
            writer.join().is_err(),
            "round {round}: the writer kept writing"
        );
        next_version += 1_000_000;

        let dirty = qemu_img_info(&img)["dirty-flag"] == true;
        if lazy {
            // A flush after an allocation set the dirty bit, and the refcounts of
            // the clusters allocated since were not written.
            if flushes.load(Ordering::SeqCst) > 0 {
                assert!(dirty, "round {round}: no dirty bit with lazy refcounts");
            }
            if dirty {
                dirty_rounds += 1;
                // Stale unless the kill fell between setting the bit and the
                // first L2 write.
                let (code, text) = qemu_img_check(&img);
                assert!(matches!(code, Some(0) | Some(2)), "round {round}:\n{text}");
                if code == Some(2) {
                    assert!(
                        text.contains("refcount=0 reference=1"),
                        "round {round}:\n{text}"
                    );
                    stale_rounds += 1;
                }
            }
        } else {
            // The dirty bit is set once the round wrote a refcount block or an
            // L2 entry (reusing the clusters that the previous round's repair
            // freed leaks one too, if killed between the two).
            dirty_rounds += dirty as u64;
            // qemu-img finds no corruption (leaks are allowed after a crash).
            let (code, text) = qemu_img_check(&img);
            assert!(
                matches!(code, Some(0) | Some(3)),
                "round {round}: qemu-img check:\n{text}"
            );
            assert!(
                !text.contains("ERROR"),
                "round {round}: qemu-img check:\n{text}"
            );
        }
        // Every block holds its flushed version or a later acknowledged one.
        let data = reference(&img, &dir, &format!("r{round}"));
        let mut s = state.lock().unwrap();
        for (b, bs) in s.iter_mut().enumerate() {
            let got = &data[b * 4096..(b + 1) * 4096];
            let ok = std::iter::once(bs.flushed)
                .chain(bs.since.iter().copied())
                .find(|v| version_data(b as u64, *v) == got);
            match ok {
                // What survived is now the durable state.
                Some(v) => {
                    bs.flushed = v;
                    bs.since.clear();
                }
                None => panic!(
                    "round {round}: block {b} holds neither its flushed version {} nor a \
                     later write {:?}; it holds {}",
                    bs.flushed,
                    bs.since,
                    decode_block(got)
                ),
            }
        }
        drop(s);
        {
            // Opening the image writable repairs it; a clean exit clears the bit.
            let sock = dir.join(&format!("r{round}-repair.sock"));
            let mut daemon = crash_daemon(&img, &sock);
            assert_eq!(daemon.terminate().code(), Some(0));
            assert_eq!(qemu_img_info(&img)["dirty-flag"], false, "round {round}");
            let (code, text) = qemu_img_check(&img);
            assert_eq!(code, Some(0), "round {round}: after repair:\n{text}");
            assert!(text.contains("No errors were found"), "{text}");
            assert!(
                !text.contains("leaked"),
                "round {round}: after repair:\n{text}"
            );
            // The repair kept the data: what was there before still is.
            let after = reference(&img, &dir, &format!("r{round}-repaired"));
            assert_same_data(&format!("round {round} repair"), &after, &data);
        }
    }
    if !lazy {
        assert!(dirty_rounds >= 1, "no round reserved clusters");
    }
    if lazy {
        assert!(
            dirty_rounds >= ROUNDS / 2,
            "only {dirty_rounds} rounds were dirty"
        );
        // The refcounts of flushed allocations were left to the repair.
        assert!(
            stale_rounds >= ROUNDS / 2,
            "only {stale_rounds} rounds had stale refcounts"
        );
    }
}

#[test]
fn sigkill_during_writes_keeps_images_consistent_and_flushed_data() {
    sigkill_rounds("strict", "cluster_size=64k", false);
}

#[test]
fn sigkill_during_writes_with_lazy_refcounts_repairs_on_open() {
    sigkill_rounds("lazy", "cluster_size=64k,lazy_refcounts=on", true);
}

#[test]
fn external_data_files_read_and_write() {
    let dir = TempDir::new("vubd-qcow2-data");
    for (tag, raw) in [("datafile", false), ("datafile-raw", true)] {
        let data = dir.join(&format!("{tag}.data"));
        let img = dir.join(&format!("{tag}.qcow2"));
        let opts = format!(
            "data_file={},data_file_raw={}",
            data.display(),
            if raw { "on" } else { "off" }
        );
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opts,
            img.to_str().unwrap(),
            "8M",
        ]);
        qemu_io(
            &img,
            "qcow2",
            &["write -P 0x3c 64k 200k", "write -z 1M 64k"],
        );
        // The data file named in the header is opened next to the image.
        check(&img, &dir, tag);
        // vubd writes into it; qemu-img agrees afterwards.
        random_writes_existing(&dir, &img, tag);
    }
}

/// Writes through vubd into an existing image, then compares with qemu-img's view
/// plus the writes, and checks the image.
fn random_writes_existing(dir: &TempDir, img: &Path, tag: &str) {
    let before = reference(img, dir, &format!("{tag}-before"));
    let (mut daemon, mut c) = serve_writable(dir, img, &format!("{tag}-w"), "");
    let mut model = before;
    let mut rng = vubd_tests::Rng::new(tag);
    for _ in 0..100 {
        let len = rng.range(1, 129) * 512;
        let off = rng.range(0, model.len() as u64 / 512 - len / 512) * 512;
        let data = rng.bytes(len as usize);
        c.q().write(off, &data).expect("write");
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    c.q().flush().expect("flush");
    drop(c);
    assert_eq!(daemon.terminate().code(), Some(0));
    qemu_img(&["check", img.to_str().unwrap()]);
    let after = reference(img, dir, &format!("{tag}-after"));
    assert_same_data(tag, &after, &model);
}

/// Images with internal snapshots that qemu-img took: the active layer reads back
/// identically, vubd's writes into clusters the snapshots share copy them (the
/// snapshots keep their data), and qemu-img finds the image clean afterwards.
#[test]
fn qemu_img_snapshots_read_back_and_survive_vubd_writes() {
    let dir = TempDir::new("vubd-qcow2-snap");
    for (tag, opts, cluster) in [
        ("snap", "cluster_size=64k", 65536u64),
        ("snap-l2ext", "extended_l2=on,cluster_size=128k", 128 * 1024),
        ("snap-c4k", "compat=0.10,cluster_size=4k", 4096),
    ] {
        let img = dir.join(&format!("{tag}.qcow2"));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            opts,
            img.to_str().unwrap(),
            "8M",
        ]);
        scribble(
            &img,
            cluster,
            cluster >= 4096 && !opts.contains("compat=0.10"),
        );
        qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
        let at_s1 = reference(&img, &dir, &format!("{tag}-s1"));
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0x71 0 100k",
                &format!("write -z {} {}", 8 * cluster, cluster),
                "write -P 0x72 3M 1M",
            ],
        );
        qemu_img(&["snapshot", "-c", "s2", img.to_str().unwrap()]);
        let at_s2 = reference(&img, &dir, &format!("{tag}-s2"));
        check(&img, &dir, tag);

        // Writes through vubd into clusters both snapshots hold.
        random_writes_existing(&dir, &img, tag);

        for (name, want) in [("s1", &at_s1), ("s2", &at_s2)] {
            let copy = dir.join(&format!("{tag}-{name}.qcow2"));
            std::fs::copy(&img, &copy).unwrap();
            qemu_img(&["snapshot", "-a", name, copy.to_str().unwrap()]);
            qemu_img(&["check", copy.to_str().unwrap()]);
            let got = reference(&copy, &dir, &format!("{tag}-{name}-applied"));
            assert_same_data(&format!("{tag}: snapshot {name}"), &got, want);
        }
    }
}

/// The qcow2 node's metadata cache statistics (vubd's `x-` fields in the
/// driver-specific section of `query-blockstats`).
fn cache_stats(q: &mut vubd_tests::Qmp, node: &str) -> serde_json::Value {
    let stats = q.ok("query-blockstats", serde_json::json!({"query-nodes": true}));
    let n = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node} in {stats}"));
    let s = n["driver-specific"].clone();
    assert_eq!(s["driver"], "qcow2", "{n}");
    s
}

fn stat(s: &serde_json::Value, key: &str) -> u64 {
    s[key].as_u64().unwrap_or_else(|| panic!("no {key} in {s}"))
}

/// Waits until `node` has been cleaned twice more: then every clean entry unused
/// since now has been dropped.
fn two_more_cleans(q: &mut vubd_tests::Qmp, node: &str) -> serde_json::Value {
    let start = stat(&cache_stats(q, node), "x-cache-cleans");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = cache_stats(q, node);
        if stat(&s, "x-cache-cleans") >= start + 2 {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "no cleaning: {s}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn read_whole(c: &mut Client) {
    let cap = c.capacity();
    let mut pos = 0;
    while pos < cap {
        let n = (cap - pos).min(MIB);
        c.q().read(pos, n as usize).expect("read");
        pos += n;
    }
}

#[test]
fn cache_clean_interval_drops_idle_metadata_cache_entries() {
    use serde_json::json;
    use std::time::{Duration, Instant};
    let dir = TempDir::new("vubd-qcow2-cache-clean");
    // 4 KiB clusters: an L2 table maps 2 MiB, so 32 MiB have 16, all allocated.
    let mut imgs = Vec::new();
    for name in ["a", "b", "c"] {
        let img = dir.join(&format!("{name}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            img.to_str().unwrap(),
            "32M",
        ]);
        let writes: Vec<String> = (0..16)
            .map(|i| format!("write -P {} {}M 4k", i + 1, 2 * i))
            .collect();
        let refs: Vec<&str> = writes.iter().map(String::as_str).collect();
        qemu_io(&img, "qcow2", &refs);
        imgs.push(img);
    }
    let qs = dir.join("qmp.sock");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let args = DaemonArgs::new()
        .monitor(&qs)
        .blockdev(&format!(
            "driver=file,node-name=fa,filename={}",
            imgs[0].display()
        ))
        .blockdev("driver=qcow2,node-name=qa,file=fa,cache-clean-interval=1")
        .blockdev(&format!(
            "driver=file,node-name=fb,filename={}",
            imgs[1].display()
        ))
        .blockdev("driver=qcow2,node-name=qb,file=fb,cache-clean-interval=0")
        .export(&format!(
            "type=vhost-user-blk,id=ea,node-name=qa,addr.type=unix,addr.path={},writable=on",
            sa.display()
        ))
        .export(&format!(
            "type=vhost-user-blk,id=eb,node-name=qb,addr.type=unix,addr.path={},writable=on",
            sb.display()
        ))
        .build();
    let mut daemon = Daemon::start(&args);
    let mut q = vubd_tests::Qmp::connect(&qs);
    let mut ca = Client::connect(&sa, 1);
    let mut cb = Client::connect(&sb, 1);
    read_whole(&mut ca);
    read_whole(&mut cb);
    let a = cache_stats(&mut q, "qa");
    assert_eq!(stat(&a, "x-l2-cache-entries"), 16, "{a}");
    assert_eq!(stat(&cache_stats(&mut q, "qb"), "x-l2-cache-entries"), 16);

    // Idle for two cleaning passes: every table of qa is dropped.
    let a = two_more_cleans(&mut q, "qa");
    assert_eq!(stat(&a, "x-l2-cache-entries"), 0, "{a}");
    assert_eq!(stat(&a, "x-refcount-cache-entries"), 0, "{a}");
    assert_eq!(stat(&a, "x-l2-cache-cleaned"), 16, "{a}");
    // qb, with cache-clean-interval=0, is never cleaned.
    let b = cache_stats(&mut q, "qb");
    assert_eq!(stat(&b, "x-l2-cache-entries"), 16, "{b}");
    assert_eq!(stat(&b, "x-cache-cleans"), 0, "{b}");

    // Reading again misses: the tables come back from the file.
    let misses = stat(&a, "x-l2-cache-misses");
    assert_eq!(ca.q().read(0, 4096).unwrap(), vec![1u8; 4096]);
    let a = cache_stats(&mut q, "qa");
    assert_eq!(stat(&a, "x-l2-cache-misses"), misses + 1, "{a}");
    assert_eq!(stat(&a, "x-l2-cache-entries"), 1, "{a}");

    // Allocating writes leave a dirty L2 table: it stays, however long it idles,
    // until a flush writes it whole. (The refcount block was written before the new
    // L2 entries reached the file, at the write itself: it is clean and may go.)
    let data = vec![0x77u8; 8192];
    ca.q().write(2 * MIB + 64 * 1024, &data).expect("write");
    let a = two_more_cleans(&mut q, "qa");
    assert_eq!(
        stat(&a, "x-l2-cache-entries"),
        1,
        "dirty L2 table dropped: {a}"
    );
    ca.q().flush().expect("flush");
    let a = two_more_cleans(&mut q, "qa");
    assert_eq!(stat(&a, "x-l2-cache-entries"), 0, "{a}");
    assert_eq!(stat(&a, "x-refcount-cache-entries"), 0, "{a}");
    assert_same_data(
        "after cleaning",
        &ca.q().read(2 * MIB + 64 * 1024, data.len()).unwrap(),
        &data,
    );

    // Deleting a node with a cleaning timer is immediate, and its image is closed
    // (and unlocked) when blockdev-del returns.
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "fc", "filename": imgs[2].to_str().unwrap()}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "qc", "file": "fc", "cache-clean-interval": 1}),
    );
    let c = two_more_cleans(&mut q, "qc");
    assert!(stat(&c, "x-cache-cleans") >= 2, "{c}");
    let t = Instant::now();
    q.ok("blockdev-del", json!({"node-name": "qc"}));
    q.ok("blockdev-del", json!({"node-name": "fc"}));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "blockdev-del took {:?}",
        t.elapsed()
    );
    qemu_img(&["check", imgs[2].to_str().unwrap()]);

    // Nor does a timer delay the daemon's exit: not the 1 s one of qa, nor the
    // default 600 s one of a node added now.
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "qd",
               "file": {"driver": "file", "filename": imgs[2].to_str().unwrap()}}),
    );
    drop(ca);
    drop(cb);
    let t = Instant::now();
    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "exit took {:?}",
        t.elapsed()
    );
    qemu_img(&["check", imgs[0].to_str().unwrap()]);
}

/// The file node's host syncs (`x-sync-operations`) and write operations.
fn file_node_io(q: &mut vubd_tests::Qmp, node: &str) -> (u64, u64) {
    let n = q.node_blockstats(node);
    (
        stat(&n["driver-specific"], "x-sync-operations"),
        stat(&n["stats"], "wr_operations"),
    )
}

/// Allocating writes followed by guest flushes cost one sync per flush, with strict
/// refcounts too: the data clusters come from reservations, whose refcounts one sync
/// made stable for a batch of clusters, so an allocating write needs no sync of its
/// own, and a flush needs none before the L2 table. Lazy refcounts save only the
/// reservations' refcount writes. Measured on the file nodes of two images served
/// side by side.
#[test]
fn allocating_writes_cost_one_sync_per_flush() {
    let dir = TempDir::new("vubd-qcow2-lazy-syncs");
    let qs = dir.join("qmp.sock");
    let mut args = DaemonArgs::new().monitor(&qs);
    for (name, opts) in [
        ("strict", "lazy_refcounts=off"),
        ("lazy", "lazy_refcounts=on"),
    ] {
        let img = dir.join(&format!("{name}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            img.to_str().unwrap(),
            "64M",
        ]);
        args = args
            .blockdev(&format!("driver=file,node-name={name}-file,filename={}", img.display()))
            .blockdev(&format!("driver=qcow2,node-name={name},file={name}-file"))
            .export(&format!(
                "type=vhost-user-blk,id={name},node-name={name},addr.type=unix,addr.path={},writable=on",
                dir.join(&format!("{name}.sock")).display()
            ));
    }
    let mut daemon = Daemon::start(&args.build());
    let mut q = vubd_tests::Qmp::connect(&qs);
    const N: u64 = 32;
    let mut measured = Vec::new();
    for name in ["strict", "lazy"] {
        let mut c = Client::connect(dir.join(&format!("{name}.sock")), 1);
        // The first write creates the L2 table; count from the second on.
        c.q().write(0, &[1u8; 65536]).expect("write");
        c.q().flush().expect("flush");
        let before = file_node_io(&mut q, &format!("{name}-file"));
        for i in 1..=N {
            // Whole new clusters: no copy-on-write.
            c.q().write(i * 65536, &[i as u8; 65536]).expect("write");
            c.q().flush().expect("flush");
        }
        let after = file_node_io(&mut q, &format!("{name}-file"));
        let (syncs, writes) = (after.0 - before.0, after.1 - before.1);
        eprintln!("{name}: {N} allocating writes + flushes: {syncs} syncs, {writes} writes");
        measured.push((syncs, writes));
    }
    // Each write puts the data and its L2 entry in the file, each flush the L2
    // table whole, with one sync (the clusters are new, and their refcounts were
    // stable before the entries were written). The first write reserved 1 MiB (16
    // clusters); the 16th counted one reserves 2 MiB more: one sync, and with strict
    // refcounts one write (its refcounts). Before reservations, strict took 3 * N
    // syncs and 4 * N writes: a sync between each write's refcount and its entry,
    // and one before each flush's L2 table.
    assert_eq!(measured[0], (N + 1, 3 * N + 1), "strict refcounts");
    assert_eq!(measured[1], (N + 1, 3 * N), "lazy refcounts");
    // The refcounts reach the file at a clean exit, which clears the dirty bit.
    assert_eq!(daemon.terminate().code(), Some(0));
    for name in ["strict", "lazy"] {
        let img = dir.join(&format!("{name}.qcow2"));
        let (code, text) = qemu_img_check(&img);
        assert_eq!(code, Some(0), "{name}:\n{text}");
        assert!(
            text.contains("No errors were found") && !text.contains("leaked"),
            "{name}:\n{text}"
        );
        assert_eq!(qemu_img_info(&img)["dirty-flag"], false, "{name}");
    }
}

/// Images with an external data file created by vubd, with `vubd img create -o
/// data_file=..,data_file_raw=on` and with QMP `blockdev-create` (`data-file` names
/// an existing node): qemu-img sees the data file, vubd serves and writes them, and
/// the raw data file holds the guest data at guest offsets.
#[test]
fn vubd_creates_images_with_external_data_files() {
    use serde_json::json;
    let dir = TempDir::new("vubd-qcow2-mkdata");
    let img = dir.join("img.qcow2");
    // Absolute: qemu-img 7.2 opens a relative data file name from its working
    // directory, vubd from the image's directory.
    let data_path = dir.join("img.data");
    let (code, out) = vubd_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={},data_file_raw=on", data_path.display()),
        img.to_str().unwrap(),
        "8M",
    ]);
    assert_eq!(code, 0, "{out}");
    let info = qemu_img_info(&img);
    assert_eq!(
        info["format-specific"]["data"]["data-file"],
        data_path.to_str().unwrap(),
        "{info}"
    );
    assert_eq!(
        info["format-specific"]["data"]["data-file-raw"], true,
        "{info}"
    );
    qemu_img(&["check", img.to_str().unwrap()]);
    random_writes_existing(&dir, &img, "img-data");
    // data_file_raw: the data file alone is the disk.
    let raw = std::fs::read(&data_path).unwrap();
    let want = reference(&img, &dir, "img-data-ref");
    assert_same_data("data file as raw", &raw[..want.len()], &want);

    // The same over QMP.
    let qs = dir.join("qmp.sock");
    let args = DaemonArgs::new().monitor(&qs).build();
    let mut daemon = Daemon::start(&args);
    let mut q = vubd_tests::Qmp::connect(&qs);
    let (meta, data) = (dir.join("q.qcow2"), dir.join("q.data"));
    for (i, p) in [&meta, &data].into_iter().enumerate() {
        q.ok(
            "blockdev-create",
            json!({"job-id": format!("f{i}"), "options": {"driver": "file",
                   "filename": p.to_str().unwrap(), "size": 0}}),
        );
        q.wait_job_concluded(&format!("f{i}"), std::time::Duration::from_secs(60));
        q.ok("job-dismiss", json!({"id": format!("f{i}")}));
        q.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": format!("n{i}"), "filename": p.to_str().unwrap()}),
        );
    }
    let e = q
        .execute(
            "blockdev-create",
            json!({"job-id": "bad", "options": {"driver": "qcow2", "file": "n0", "size": 8 * MIB,
                   "data-file-raw": true}}),
        )
        .unwrap_err();
    assert!(e.desc.contains("data-file"), "{}", e.desc);
    q.ok(
        "blockdev-create",
        json!({"job-id": "j", "options": {"driver": "qcow2", "file": "n0", "size": 8 * MIB,
               "data-file": "n1", "data-file-raw": true}}),
    );
    let job = q.wait_job_concluded("j", std::time::Duration::from_secs(60));
    assert!(job.get("error").is_none(), "{job}");
    q.ok("job-dismiss", json!({"id": "j"}));
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "qn", "file": "n0", "data-file": "n1"}),
    );
    let sock = dir.join("qn.sock");
    q.ok(
        "block-export-add",
        json!({"type": "vhost-user-blk", "id": "e", "node-name": "qn", "writable": true,
               "addr": {"type": "unix", "path": sock.to_str().unwrap()}}),
    );
    let mut c = Client::connect(&sock, 1);
    let block = vec![0x5du8; 64 * 1024];
    c.q().write(MIB, &block).expect("write");
    c.q().flush().expect("flush");
    drop(c);
    assert_eq!(daemon.terminate().code(), Some(0));
    let info = qemu_img_info(&meta);
    assert_eq!(
        info["format-specific"]["data"]["data-file"],
        data.to_str().unwrap(),
        "{info}"
    );
    qemu_img(&["check", meta.to_str().unwrap()]);
    let raw = std::fs::read(&data).unwrap();
    assert_same_data(
        "QMP-made data file",
        &raw[MIB as usize..MIB as usize + block.len()],
        &block,
    );
}
