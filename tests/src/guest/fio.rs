//! fio in a guest, in the background, in rounds: each round writes a region with random
//! 4 KiB writes and then reads every block back with crc32c verification. A new round
//! starts with a new seed, so a block that kept an earlier round's data fails the
//! verification (fio checks the seed in each block's header). Rounds go on until the
//! host asks them to stop or one fails, which lets a test do slow things (kill and
//! restart the daemon, migrate the VM) while the guest's I/O never pauses, and still
//! end on a complete verification pass.

use super::{Guest, CMD_TIMEOUT};
use std::time::{Duration, Instant};

/// One fio job set on one disk.
#[derive(Debug, Clone)]
pub struct FioRounds {
    /// Names the files in the guest's /tmp (`<tag>.rounds`, `<tag>.round.<n>`, ...).
    pub tag: String,
    /// The block device, e.g. `/dev/vda`.
    pub dev: String,
    /// Jobs, each on its own region (`offset_increment`), pinned to its own vCPU so
    /// that each uses its own virtqueue when there are as many.
    pub jobs: usize,
    /// MiB per job.
    pub mib_per_job: u64,
    /// Where the first job's region starts, in MiB.
    pub offset_mib: u64,
    pub iodepth: usize,
    /// Other fio options (each starting with `--`).
    pub extra: String,
}

/// What one round did.
#[derive(Debug, Clone)]
pub struct Round {
    pub number: u32,
    /// fio's exit status.
    pub status: i32,
    /// fio's output (its summary lines, or all of it when the round failed).
    pub output: String,
}

impl FioRounds {
    pub fn new(tag: &str, dev: &str, jobs: usize, mib_per_job: u64) -> FioRounds {
        FioRounds {
            tag: tag.to_string(),
            dev: dev.to_string(),
            jobs,
            mib_per_job,
            offset_mib: 0,
            iodepth: 16,
            extra: String::new(),
        }
    }

    fn fio_command(&self) -> String {
        let cpus = if self.jobs > 1 {
            format!(
                " --cpus_allowed=0-{} --cpus_allowed_policy=split",
                self.jobs - 1
            )
        } else {
            String::new()
        };
        format!(
            "fio --name={tag} --filename={dev} --direct=1 --ioengine=libaio --rw=randwrite \
             --bs=4k --size={size}M --offset={off}M --offset_increment={size}M \
             --numjobs={jobs} --iodepth={depth}{cpus} --verify=crc32c --verify_fatal=1 \
             --do_verify=1 --randseed=$((i * 7919 + 17)) --group_reporting --eta=never {extra}",
            tag = self.tag,
            dev = self.dev,
            size = self.mib_per_job,
            off = self.offset_mib,
            jobs = self.jobs,
            depth = self.iodepth,
            extra = self.extra,
        )
    }

    /// Starts the rounds in the background.
    pub fn start(&self, g: &mut Guest) {
        let t = &self.tag;
        g.check(
            &format!(
                "rm -f /tmp/{t}.stop /tmp/{t}.done /tmp/{t}.rounds /tmp/{t}.round.*\n\
                 (\n\
                 i=0\n\
                 while [ ! -e /tmp/{t}.stop ]; do\n\
                 i=$((i + 1))\n\
                 {fio} >/tmp/{t}.round.$i 2>&1\n\
                 rc=$?\n\
                 echo \"$i $rc\" >>/tmp/{t}.rounds\n\
                 [ $rc -eq 0 ] || break\n\
                 done\n\
                 echo done >/tmp/{t}.done\n\
                 ) </dev/null >/dev/null 2>&1 &",
                fio = self.fio_command()
            ),
            CMD_TIMEOUT,
        );
    }

    /// Whether the rounds are still going (no round has failed, no stop yet).
    pub fn running(&self, g: &mut Guest) -> bool {
        g.run(&format!("[ ! -e /tmp/{}.done ]", self.tag), CMD_TIMEOUT)
            .0
            == 0
    }

    /// Rounds finished so far.
    pub fn finished_rounds(&self, g: &mut Guest) -> usize {
        g.check(
            &format!("cat /tmp/{}.rounds 2>/dev/null || true", self.tag),
            CMD_TIMEOUT,
        )
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
    }

    /// Asks the rounds to stop after the current one, waits for it (up to `timeout`;
    /// `Err` with what is known if it does not end) and returns every round.
    pub fn stop(&self, g: &mut Guest, timeout: Duration) -> Result<Vec<Round>, String> {
        let t = &self.tag;
        g.check(&format!("touch /tmp/{t}.stop"), CMD_TIMEOUT);
        let deadline = Instant::now() + timeout;
        while self.running(g) {
            if Instant::now() > deadline {
                let ps = g.check("ps; cat /proc/loadavg", CMD_TIMEOUT);
                let rounds = self.finished_rounds(g);
                return Err(format!(
                    "fio {t} ({}) still running {timeout:?} after the stop request, \
                     {rounds} round(s) finished; guest processes:\n{ps}",
                    self.dev
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(self.rounds(g))
    }

    /// Ends the rounds and takes the guest's view of its disk (the block tests'
    /// reference): stops fio, requires every round clean and no disk error in the
    /// kernel log, flushes `self.dev` and copies it whole, with O_DIRECT, onto
    /// `copy_to`. Returns the rounds verified, or the problems seen.
    pub fn quiesce_and_copy(
        &self,
        g: &mut Guest,
        copy_to: &str,
        timeout: Duration,
    ) -> Result<usize, String> {
        let rounds = self.stop(g, timeout)?;
        let mut problems = round_problems(&rounds);
        problems.extend(disk_errors_in_dmesg(&g.dmesg()));
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        // GNU dd fsyncs its output even when it copied nothing: a FLUSH of the disk.
        g.check(
            &format!(
                "dd if=/dev/null of={dev} conv=notrunc,fsync status=none && \
                 dd if={dev} of={copy_to} bs=1M iflag=direct oflag=direct conv=fsync status=none",
                dev = self.dev
            ),
            CMD_TIMEOUT,
        );
        Ok(rounds.len())
    }

    /// The rounds finished so far, with their output.
    pub fn rounds(&self, g: &mut Guest) -> Vec<Round> {
        let t = &self.tag;
        let list = g.check(
            &format!("cat /tmp/{t}.rounds 2>/dev/null || true"),
            CMD_TIMEOUT,
        );
        let mut out = Vec::new();
        for l in list.lines() {
            let mut w = l.split_whitespace();
            let (Some(n), Some(rc)) = (w.next(), w.next()) else {
                continue;
            };
            let (Ok(number), Ok(status)) = (n.parse::<u32>(), rc.parse::<i32>()) else {
                continue;
            };
            let filter = if status == 0 {
                " | grep -E 'err=|verify|READ:|WRITE:|error'"
            } else {
                ""
            };
            let output = g
                .run(&format!("cat /tmp/{t}.round.{number}{filter}"), CMD_TIMEOUT)
                .1;
            out.push(Round {
                number,
                status,
                output,
            });
        }
        out
    }
}

/// Problems in `rounds`: a failed round, an I/O or verification error, a round without
/// both a write and a verification summary; empty when all is well.
pub fn round_problems(rounds: &[Round]) -> Vec<String> {
    let mut p = Vec::new();
    if rounds.is_empty() {
        p.push("no round finished".to_string());
    }
    for r in rounds {
        let bad = r.status != 0
            || !r.output.contains("err= 0")
            || r.output.lines().any(|l| {
                let l = l.trim_start();
                (l.contains("err=") && !l.contains("err= 0"))
                    || l.starts_with("verify:")
                    || l.contains("bad magic")
                    || l.contains("verify failed")
            })
            || !r.output.contains("READ:")
            || !r.output.contains("WRITE:");
        if bad {
            p.push(format!(
                "round {} (exit status {}):\n{}",
                r.number, r.status, r.output
            ));
        }
    }
    p
}

/// Kernel log lines that mean the guest saw a disk problem.
pub fn disk_errors_in_dmesg(dmesg: &str) -> Vec<String> {
    const SIGNS: &[&str] = &[
        "I/O error",
        "blk_update_request",
        "critical medium error",
        "is not a head",
        "hung_task",
        "blocked for more than",
        "Buffer I/O",
        "BUG",
        "WARNING",
    ];
    dmesg
        .lines()
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(str::to_string)
        .collect()
}
