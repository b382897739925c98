//! `anteroom probe URL`.

use clap::Args;

use crate::BoxError;

/// Flags of `anteroom probe`.
#[derive(Clone, Debug, Args)]
pub struct ProbeArgs {
    /// The backend, e.g. http://127.0.0.1:8080 (as `upstream` would name it).
    #[arg(value_name = "URL")]
    pub url: String,
    /// The model the test requests ask for (default: the first it lists).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// Print the findings as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Probe and print; fails only when the URL is not one.
pub async fn run(args: ProbeArgs) -> Result<(), BoxError> {
    let report = crate::backend::probe::probe(&args.url, args.model.as_deref()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
