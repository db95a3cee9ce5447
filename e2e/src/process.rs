//! Child processes that cannot outlive the test process.
//!
//! Each component (etcd, kube-apiserver) runs under a tiny `sh` guard that is the leader of a new
//! process group. The guard's stdin is a pipe whose only writer is this process (the "lifeline").
//! When the lifeline closes — on `stop`, on drop, or because this process exited or was killed
//! (statics are never dropped; a panicking or SIGKILLed test binary still closes its pipes) — the
//! guard sends SIGTERM to the component, escalates to SIGKILL after a grace period, waits for it
//! and removes its working directory. No orphans, no `unsafe` pre-exec hooks.
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::HarnessError;

/// The guard: runs "$@" in the background, waits for EOF on the lifeline (fd 3) or for the
/// component to exit, whichever is first. The watcher's sleep is a kill timeout, not a sync.
const GUARD_SCRIPT: &str = r#"
exec 3<&0 </dev/null
"$@" 3<&- &
child=$!
(
  read -r _ <&3
  kill -TERM "$child" 2>/dev/null
  trap 'kill "$timer" 2>/dev/null; exit 0' TERM
  sleep "$KEYBRAKE_GUARD_GRACE" & timer=$!
  wait "$timer"
  kill -KILL "$child" 2>/dev/null
) &
watcher=$!
exec 3<&-
wait "$child"
code=$?
kill "$watcher" 2>/dev/null
if [ -n "$KEYBRAKE_GUARD_CLEANUP" ]; then rm -rf -- "$KEYBRAKE_GUARD_CLEANUP"; fi
exit "$code"
"#;

/// Seconds a component gets between SIGTERM and SIGKILL.
const GRACE_SECONDS: u64 = 10;

pub(crate) struct GuardedProcess {
    component: &'static str,
    guard: Child,
    lifeline: Option<ChildStdin>,
    log: PathBuf,
}

impl GuardedProcess {
    /// Starts `program args` under a guard; stdout and stderr go to `log`. `cleanup`, if given, is
    /// removed after the component exits.
    pub(crate) fn spawn(
        component: &'static str,
        program: &Path,
        args: &[OsString],
        log: &Path,
        cleanup: Option<&Path>,
    ) -> Result<Self, HarnessError> {
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(HarnessError::io(format!("open {}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(HarnessError::io("clone log handle"))?;
        let guard = Command::new("/bin/sh")
            .arg("-c")
            .arg(GUARD_SCRIPT)
            .arg(component)
            .arg(program)
            .args(args)
            .env("KEYBRAKE_GUARD_GRACE", GRACE_SECONDS.to_string())
            .env(
                "KEYBRAKE_GUARD_CLEANUP",
                cleanup.map(Path::as_os_str).unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(HarnessError::io(format!("spawn {}", program.display())))?;
        let mut guard = guard;
        let lifeline = guard.stdin.take();
        Ok(GuardedProcess {
            component,
            guard,
            lifeline,
            log: log.to_path_buf(),
        })
    }

    /// The component's exit status, if it has exited.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        self.guard.try_wait().ok().flatten()
    }

    /// Fails with the log tail if the component has exited.
    pub(crate) fn ensure_running(&mut self) -> Result<(), HarnessError> {
        match self.exit_status() {
            None => Ok(()),
            Some(status) => Err(HarnessError::ExitedEarly {
                component: self.component,
                status: status.to_string(),
                log_tail: self.log_tail(),
            }),
        }
    }

    pub(crate) fn log_tail(&self) -> String {
        tail(&self.log, 25)
    }

    /// Closes the lifeline and waits (bounded) for the guard to finish; kills the whole process
    /// group if it does not.
    pub(crate) fn stop(&mut self) {
        drop(self.lifeline.take());
        let deadline = Instant::now() + Duration::from_secs(GRACE_SECONDS + 5);
        while Instant::now() < deadline {
            if self.exit_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.guard.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.guard.wait();
    }
}

impl Drop for GuardedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` lines of a log file (at most the last 64 KiB are read).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_ok() {
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "keybrake-e2e-unit-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn alive(pid: &str) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    }

    #[test]
    fn closing_the_lifeline_stops_the_component_and_cleans_up() {
        let dir = temp_dir("guard");
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let pid_file = dir.join("pid");
        // A component that would run for a long time: records its pid, then blocks.
        let script = format!("echo $$ > {}; exec sleep 600", pid_file.display());
        let mut process = GuardedProcess::spawn(
            "sleeper",
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &dir.join("log"),
            Some(&work),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Ok(pid) = std::fs::read_to_string(&pid_file)
                && !pid.trim().is_empty()
            {
                break pid.trim().to_string();
            }
            assert!(Instant::now() < deadline, "component never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(alive(&pid));
        process.ensure_running().unwrap();
        process.stop();
        assert!(process.exit_status().is_some());
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(&pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(&pid), "component {pid} outlived its guard");
        assert!(!work.exists(), "cleanup dir not removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn early_exit_reports_the_log_tail() {
        let dir = temp_dir("early");
        let mut process = GuardedProcess::spawn(
            "failing",
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "echo 'bind: address already in use' >&2; exit 3".into(),
            ],
            &dir.join("log"),
            None,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while process.exit_status().is_none() {
            assert!(Instant::now() < deadline, "guard did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = process.ensure_running().unwrap_err().to_string();
        assert!(err.contains("failing exited"), "{err}");
        assert!(err.contains("address already in use"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
