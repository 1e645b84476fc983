//! `vubd img snapshot`: list, create, apply and delete internal snapshots of a qcow2
//! image, with qemu-img's options; and the snapshot table that `-l` and `info` print,
//! laid out as qemu-img 7.2 lays it out.

use super::{image_err, open_image, usage, Access, ImgError, Parsed, Result};
use qcow::{block_on, NewSnapshot, Snapshot};

/// What `vubd img snapshot` is asked to do.
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

fn action(p: &Parsed) -> Result<Action> {
    let given: Vec<&(String, String)> = p
        .opts
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "-l" | "-c" | "-a" | "-d"))
        .collect();
    match given.as_slice() {
        [] => Err(usage("snapshot: expected one of -l, -c, -a, -d")),
        [(k, v)] => Ok(match k.as_str() {
            "-l" => Action::List,
            "-c" => Action::Create(v.clone()),
            "-a" => Action::Apply(v.clone()),
            _ => Action::Delete(v.clone()),
        }),
        _ => Err(usage("snapshot: cannot mix '-l', '-a', '-c', '-d'")),
    }
}

/// What went wrong, in words for a person (the image's errors carry the name again).
fn describe(e: qcow::Error) -> String {
    match e {
        qcow::Error::SnapshotNotFound(_) => "no snapshot has this id or name".into(),
        qcow::Error::SnapshotExists(_) => "a snapshot with this name exists already".into(),
        other => other.to_string(),
    }
}

pub(super) fn snapshot(args: &[String]) -> Result<()> {
    let p = Parsed::new(
        args,
        &["-c", "-a", "-d", "-f"],
        &["-l", "-q", "-U", "--force-share"],
    )?;
    let action = action(&p)?;
    let file = p.one_file()?;
    if let Some(fmt) = p.last("-f").filter(|f| *f != "qcow2") {
        return Err(ImgError::Image {
            path: file.into(),
            message: format!("format '{fmt}' has no internal snapshots (qcow2 has)"),
        });
    }
    let (verb, name) = match &action {
        Action::List => {
            let img = open_image(file, p.read_access(), false)?;
            print!("{}", table(&img.snapshots()));
            return Ok(());
        }
        Action::Create(n) => ("create", n),
        Action::Apply(n) => ("apply", n),
        Action::Delete(n) => ("delete", n),
    };
    let failed = |e: qcow::Error| ImgError::Image {
        path: file.into(),
        message: format!("Could not {verb} snapshot '{name}': {}", describe(e)),
    };
    if name.is_empty() {
        return Err(usage(format!("snapshot: -{} needs a name", &verb[..1])));
    }
    let img = open_image(file, Access::Write, true)?;
    let done = block_on(async {
        match &action {
            // As qemu-img: no guest clock, and an instruction count of 0.
            Action::Create(n) => img
                .snapshot_create_with(NewSnapshot {
                    icount: Some(0),
                    ..NewSnapshot::now(n)
                })
                .await
                .map(drop),
            Action::Apply(n) => img.snapshot_revert(n).await,
            Action::Delete(n) => img.snapshot_delete(n).await.map(drop),
            Action::List => Ok(()),
        }
    });
    // As in qemu-img, snapshot operations leave the bitmaps as they are (valid).
    let released = block_on(img.release_bitmaps());
    let closed = block_on(img.close());
    done.map_err(failed)?;
    released.map_err(image_err(file))?;
    closed.map_err(image_err(file))
}

/// `Snapshot list:` and one line per snapshot, as `qemu-img snapshot -l` and
/// `qemu-img info` print them; nothing when there are none.
pub(super) fn table(snaps: &[Snapshot]) -> String {
    if snaps.is_empty() {
        return String::new();
    }
    let mut out = String::from("Snapshot list:\n");
    out += &left("ID", 10);
    out += &left("TAG", 17);
    out += &right("VM SIZE", 8);
    out += &right("DATE", 20);
    out += &right("VM CLOCK", 13);
    out += &right("ICOUNT", 11);
    out.push('\n');
    for s in snaps {
        let secs = s.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            s.vm_clock_nsec / 1_000_000 % 1000
        );
        out += &left(&s.id, 9);
        out.push(' ');
        out += &left(&s.name, 16);
        out.push(' ');
        out += &right(&size_to_str(s.vm_state_size), 8);
        out += &right(&local_date(s.date_sec), 20);
        out += &right(&clock, 13);
        out += &right(&s.icount.map(|n| n.to_string()).unwrap_or_default(), 11);
        out.push('\n');
    }
    out
}

/// `s` padded with spaces after it to `width` bytes (C's `%-Ns`).
fn left(s: &str, width: usize) -> String {
    format!("{s}{}", " ".repeat(width.saturating_sub(s.len())))
}

/// `s` padded with spaces before it to `width` bytes (C's `%Ns`).
fn right(s: &str, width: usize) -> String {
    format!("{}{s}", " ".repeat(width.saturating_sub(s.len())))
}

/// The date in the local time zone, `YYYY-MM-DD HH:MM:SS`.
fn local_date(secs: u32) -> String {
    match jiff::Timestamp::from_second(i64::from(secs)) {
        Ok(t) => t
            .to_zoned(jiff::tz::TimeZone::system())
            .strftime("%Y-%m-%d %H:%M:%S")
            .to_string(),
        Err(_) => String::new(),
    }
}

/// A byte count in QEMU's human form: three significant digits and a binary unit,
/// switching to the next unit from 1000 on ("0 B", "999 B", "0.977 KiB", "1.5 MiB").
fn size_to_str(val: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0;
    while i < UNITS.len() - 1 && val as f64 >= 1000.0 * 1024f64.powi(i as i32) {
        i += 1;
    }
    let v = val as f64 / 1024f64.powi(i as i32);
    format!("{} {}B", three_digits(v), UNITS[i])
}

/// C's `%0.3g` for a value below 1000 after rounding (at most three significant
/// digits, trailing zeros dropped).
fn three_digits(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let e = format!("{v:.2e}");
    let exp: i32 = e
        .split_once('e')
        .and_then(|(_, x)| x.parse().ok())
        .unwrap_or(0);
    if !(-4..3).contains(&exp) {
        // Only 999.5 and up round to four digits here.
        let (m, _) = e.split_once('e').unwrap_or((&e, ""));
        let m = m.trim_end_matches('0').trim_end_matches('.');
        return format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let s = format!("{v:.*}", (2 - exp) as usize);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_prints_them() {
        for (v, want) in [
            (0, "0 B"),
            (1, "1 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (1024, "1 KiB"),
            (1536, "1.5 KiB"),
            (10 << 20, "10 MiB"),
            (1_023_999, "1e+03 KiB"),
            ((1 << 30) + (1 << 29), "1.5 GiB"),
            (123_456_789, "118 MiB"),
        ] {
            assert_eq!(size_to_str(v), want, "{v}");
        }
    }

    #[test]
    fn table_layout() {
        let s = Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id: "12".into(),
            name: "before".into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 3_723_004_000_000,
            vm_state_size: 0,
            disk_size: None,
            icount: Some(0),
            extra: Vec::new(),
        };
        let t = table(&[s]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "Snapshot list:");
        assert_eq!(
            lines[1],
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
        );
        assert!(
            lines[2].starts_with("12        before                0 B "),
            "{t}"
        );
        assert!(lines[2].ends_with(" 01:02:03.004          0"), "{t}");
        assert_eq!(lines[2].len(), lines[1].len());
        assert_eq!(table(&[]), "");
    }
}
