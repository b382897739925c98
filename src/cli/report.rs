//! `anteroom report FILE`: summarise a request log.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::PathBuf;

use clap::Args;

use crate::report::{self, GroupBy};
use crate::BoxError;

/// Flags of `anteroom report`.
#[derive(Clone, Debug, Args)]
pub struct ReportArgs {
    /// The request log (JSONL, as written by `--request-log`); `-` for stdin.
    pub file: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Add one line per group.
    #[arg(long, value_enum)]
    pub by: Option<GroupBy>,
}

/// Read the log and print the report.
pub fn run(args: &ReportArgs) -> Result<(), BoxError> {
    let report = if args.file.as_os_str() == "-" {
        report::read(std::io::stdin().lock(), args.by)?
    } else {
        let file = File::open(&args.file)
            .map_err(|e| format!("cannot open {}: {e}", args.file.display()))?;
        report::read(BufReader::with_capacity(1 << 20, file), args.by)?
    };
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report::render(&report, &args.file.display().to_string())
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}
