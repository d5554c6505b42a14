//! Standard output of the CLI, without `println!`'s panic when the reader
//! goes away.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe fails with `EPIPE` and
//! `println!` panics on it: `trellis cluster status | head -1` printed a
//! panic. Operator verbs write through `outln!`, which ends the process
//! with status 0 when the reader has gone, as `cat` or `ls` would (by
//! SIGPIPE). Long-running roles write through `noteln!`, which drops the
//! line instead: a server must not stop because whoever started it stopped
//! reading its stdout. Resetting SIGPIPE to its default would need `unsafe`
//! (denied by the workspace's lints) and would kill the roles on any
//! closed socket.

use std::fmt::Arguments;
use std::io::{self, Write};

/// Prints a line for an operator verb; a closed stdout ends the process
/// quietly (status 0), any other write error with status 1.
macro_rules! outln {
    () => { $crate::out::verb(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::out::verb(format_args!($($arg)*), true) };
}

/// Prints a line for a long-running role; a write error drops the line.
macro_rules! noteln {
    () => { $crate::out::note(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::out::note(format_args!($($arg)*), true) };
}

/// Like `noteln!` without the newline, flushed at once (progress lines).
macro_rules! note {
    ($($arg:tt)*) => { $crate::out::note(format_args!($($arg)*), false) };
}

/// Writes `args` (and a newline) to stdout, or ends the process.
pub(crate) fn verb(args: Arguments<'_>, newline: bool) {
    if let Err(e) = write(args, newline) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Writes `args` (and a newline) to stdout; failures are dropped.
pub(crate) fn note(args: Arguments<'_>, newline: bool) {
    let _ = write(args, newline);
}

fn write(args: Arguments<'_>, newline: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)?;
    if newline {
        out.write_all(b"\n")?;
    }
    out.flush()
}
