use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = anteroom::cli::Cli::parse();
    let format = cli.log_format;
    anteroom::cli::init_logging(format);
    match anteroom::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let why = anteroom::error::chain(&*e);
            match format {
                anteroom::cli::LogFormat::Json => tracing::error!(error = %why, "anteroom stopped"),
                anteroom::cli::LogFormat::Human => eprintln!("anteroom: {why}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
