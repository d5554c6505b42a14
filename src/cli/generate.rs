//! `trellis generate`: man pages and shell completions, made from the one
//! clap definition of the command line (the packages ship them).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    /// Write man pages here: trellis.1 and one page per subcommand
    /// (trellis-agent.1, trellis-agent-setup.1, …).
    #[arg(long, value_name = "DIR")]
    man: Option<PathBuf>,
    /// Write shell completions here: trellis.bash, _trellis (zsh) and
    /// trellis.fish.
    #[arg(long, value_name = "DIR")]
    completions: Option<PathBuf>,
}

impl GenerateArgs {
    pub(crate) fn run(self) -> Result<()> {
        if self.man.is_none() && self.completions.is_none() {
            return Err(
                crate::cli::UsageError("give --man DIR, --completions DIR or both".into()).into(),
            );
        }
        let cmd = Cli::command();
        if let Some(dir) = &self.man {
            mkdir(dir)?;
            // Hidden subcommands (testbed tools, this one) get no page.
            clap_mangen::generate_to(cmd.clone(), dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
        }
        if let Some(dir) = &self.completions {
            mkdir(dir)?;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut cmd.clone(), "trellis", dir)
                    .with_context(|| format!("writing {shell} completions to {}", dir.display()))?;
            }
        }
        Ok(())
    }
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
