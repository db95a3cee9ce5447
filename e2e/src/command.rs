//! Running kubectl/helm from tests with readable failures.
use std::io::Write;
use std::process::{Command, ExitStatus, Stdio};

/// What a finished command printed.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The command line, for assertion messages.
    pub command: String,
}

impl CommandOutput {
    /// Panics with the command line and both streams unless it exited 0.
    #[track_caller]
    pub fn expect_success(self) -> Self {
        assert!(self.status.success(), "command failed: {self}");
        self
    }

    /// Panics unless it failed; returns it so the caller can check stderr.
    #[track_caller]
    pub fn expect_failure(self) -> Self {
        assert!(
            !self.status.success(),
            "command unexpectedly succeeded: {self}"
        );
        self
    }
}

impl std::fmt::Display for CommandOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` ({})\n--- stdout\n{}\n--- stderr\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion, stdin closed.
pub fn run(cmd: &mut Command) -> CommandOutput {
    run_with_stdin(cmd, "")
}

/// Runs `cmd` to completion, feeding it `stdin` (e.g. YAML for `kubectl apply -f -`).
pub fn run_with_stdin(cmd: &mut Command, stdin: &str) -> CommandOutput {
    let command = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {command}: {e}"));
    let mut pipe = child.stdin.take().expect("piped stdin");
    let input = stdin.as_bytes().to_vec();
    // Feed stdin from a thread so a large input cannot deadlock against a full stdout pipe.
    let feeder = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {command}: {e}"));
    let _ = feeder.join();
    CommandOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        command,
    }
}
