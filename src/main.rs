//! `trellis`: one binary for every role of the mesh (server, gateway, agent)
//! and the operator verbs. See `trellis --help`.

// Output goes through `out`, which handles a closed stdout.
#![warn(clippy::print_stdout)]

use std::process::ExitCode;

use clap::Parser;

#[macro_use]
mod out;

mod cli;
mod dev;
mod heap;
mod systemd;
mod telemetry;
mod version;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for bad command lines and bad configuration (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    // One crypto provider for the whole process, before any TLS config exists.
    // It can only fail if another provider was installed first, which this
    // binary never does, so the result carries no information.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    cli.init_logging();
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        // Bad configuration is the caller's to fix: EX_USAGE.
        Err(e) if e.chain().any(|c| c.is::<cli::UsageError>()) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
