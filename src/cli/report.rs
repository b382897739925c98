//! `anteroom report FILE…`: summarise a request log, or put runs side by
//! side.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::PathBuf;

use clap::Args;

use crate::report::{self, GroupBy, Report};
use crate::BoxError;

/// Flags of `anteroom report`.
#[derive(Clone, Debug, Args)]
pub struct ReportArgs {
    /// The request log (JSONL, as written by `--request-log`); `-` for
    /// stdin. Several: each is summarised, then all are compared, the
    /// first as the baseline.
    #[arg(required = true, value_name = "FILE")]
    pub file: Vec<PathBuf>,
    /// Print JSON instead of tables (several files: `{"runs": [{"file",
    /// "report"}, …]}`).
    #[arg(long)]
    pub json: bool,
    /// Add one line per group.
    #[arg(long, value_enum)]
    pub by: Option<GroupBy>,
}

fn read(path: &PathBuf, by: Option<GroupBy>) -> Result<Report, BoxError> {
    Ok(if path.as_os_str() == "-" {
        report::read(std::io::stdin().lock(), by)?
    } else {
        let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        report::read(BufReader::with_capacity(1 << 20, file), by)?
    })
}

/// Read the log(s) and print the report.
pub fn run(args: &ReportArgs) -> Result<(), BoxError> {
    let mut runs = Vec::with_capacity(args.file.len());
    for path in &args.file {
        runs.push((path.display().to_string(), read(path, args.by)?));
    }
    let text = match (args.json, runs.as_slice()) {
        (true, [(_, one)]) => serde_json::to_string_pretty(one)? + "\n",
        (true, _) => {
            let runs: Vec<_> = runs
                .iter()
                .map(|(file, report)| serde_json::json!({"file": file, "report": report}))
                .collect();
            serde_json::to_string_pretty(&serde_json::json!({ "runs": runs }))? + "\n"
        }
        (false, [(name, one)]) => report::render(one, name),
        (false, _) => {
            let mut text = String::new();
            for (name, r) in &runs {
                text += &report::render(r, name);
                text.push('\n');
            }
            text + &report::compare(&runs)
        }
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}
