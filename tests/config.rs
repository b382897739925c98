//! The shipped config files and the command line.

use std::process::Command;

use anteroom::config::Concurrency;
use anteroom::config::FileConfig;

fn config_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

#[test]
fn every_shipped_config_parses_and_validates() {
    let mut seen = 0;
    for entry in std::fs::read_dir(config_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let file = anteroom::app::read_config(&path).unwrap_or_else(|e| panic!("{e}"));
            file.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 3, "default, lmstudio and vllm at least");
}

#[test]
fn default_toml_lists_exactly_the_defaults() {
    let file = anteroom::app::read_config(&config_dir().join("default.toml")).unwrap();
    assert_eq!(file, FileConfig::default());
    // Every key is written out, none left to the defaults.
    let text = std::fs::read_to_string(config_dir().join("default.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let full = toml::Table::try_from(FileConfig::default()).unwrap();
    let mut keys: Vec<_> = table.keys().collect();
    let mut all: Vec<_> = full.keys().collect();
    keys.sort();
    all.sort();
    assert_eq!(keys, all);
}

#[test]
fn shipped_configs_say_what_they_are_for() {
    // LM Studio's default: 4 concurrent predictions per model.
    let lm = anteroom::app::read_config(&config_dir().join("lmstudio.toml")).unwrap();
    assert_eq!(lm.max_concurrency, Concurrency::Fixed(4));
    assert!(matches!(&lm.upstream, anteroom::config::Upstreams::One(u) if u.ends_with(":1234")));
    let vllm = anteroom::app::read_config(&config_dir().join("vllm.toml")).unwrap();
    assert!(matches!(vllm.max_concurrency, Concurrency::Fixed(n) if n > 1));
    assert!(matches!(&vllm.upstream, anteroom::config::Upstreams::One(u) if u.ends_with(":8000")));
    // llama-server reports its slots: read, not written down.
    let llama = anteroom::app::read_config(&config_dir().join("llama-server.toml")).unwrap();
    assert_eq!(llama.max_concurrency, Concurrency::Backend);
    assert!(matches!(&llama.upstream, anteroom::config::Upstreams::One(u) if u.ends_with(":8080")));
    assert!(llama.validate().is_ok());
}

fn anteroom(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[test]
fn serve_refuses_an_unknown_key_and_names_it() {
    let dir = std::env::temp_dir().join(format!("anteroom-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "max_concurent = 3\n").unwrap();
    let out = anteroom(&["serve", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_concurent"));

    std::fs::write(&bad, "queue_timeout = \"soon\"\n").unwrap();
    let out = anteroom(&["serve", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue_timeout"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serve_refuses_bad_flag_values_and_names_the_key() {
    let out = anteroom(&["serve", "--max-concurrency", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_concurrency"));
    let out = anteroom(&["serve", "--queue-timeout", "10 parsecs"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue_timeout"));
}

#[test]
fn flags_override_the_file() {
    use anteroom::cli::serve::ServeArgs;
    let args = ServeArgs {
        config: Some(config_dir().join("lmstudio.toml")),
        max_concurrency: Some(7.into()),
        queue_timeout: Some("5s".into()),
        ..ServeArgs::default()
    };
    let file = args.file_config().unwrap();
    assert_eq!(file.max_concurrency, Concurrency::Fixed(7));
    assert_eq!(file.queue_timeout, "5s");
    assert_eq!(
        file.upstream,
        "http://127.0.0.1:1234".into(),
        "the file's other keys stay"
    );
}

#[test]
fn the_cli_contract_is_accepted() {
    use anteroom::cli::{Cli, Command as Sub};
    use clap::Parser;
    let cli = Cli::try_parse_from([
        "anteroom",
        "serve",
        "--upstream",
        "http://127.0.0.1:1234",
        "--listen",
        "127.0.0.1:8080",
        "--admin-listen",
        "127.0.0.1:8081",
        "--max-concurrency",
        "2",
        "--max-queue",
        "10",
        "--queue-timeout",
        "500ms",
        "--config",
        "x.toml",
    ])
    .unwrap();
    let Sub::Serve(args) = cli.command else {
        panic!("serve")
    };
    assert_eq!(args.max_queue, Some(10));
    assert_eq!(args.queue_timeout.as_deref(), Some("500ms"));
}

#[test]
fn max_concurrency_is_a_number_auto_or_backend() {
    let auto = FileConfig::parse("max_concurrency = \"auto\"\nauto_max_concurrency = 16").unwrap();
    assert_eq!(auto.max_concurrency, Concurrency::Auto);
    let c = auto.validate().unwrap();
    let adaptive = c.adaptive.expect("auto has bounds");
    assert_eq!((adaptive.bounds.min, adaptive.bounds.max), (1, 16));
    assert!(!adaptive.follow_backend);
    let backend = FileConfig::parse("max_concurrency = \"backend\"").unwrap();
    assert_eq!(backend.max_concurrency, Concurrency::Backend);
    assert!(backend.validate().unwrap().adaptive.unwrap().follow_backend);
    // "backend" with a backend that is never asked is refused, by name.
    let err = FileConfig::parse("max_concurrency = \"backend\"\nbackend = \"openai\"")
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(err.0.contains("backend"), "{}", err.0);
    let err = FileConfig::parse("backend = \"tgi\"").unwrap_err();
    assert!(
        err.0.contains("llama.cpp") && err.0.contains("backend"),
        "{}",
        err.0
    );
    assert_eq!(c.limits.max_concurrency, 1, "starts at the minimum");
    let err = FileConfig::parse("max_concurrency = \"lots\"").unwrap_err();
    assert!(err.0.contains("auto"), "{}", err.0);
    let bad = FileConfig::parse(
        "max_concurrency = \"auto\"\nauto_min_concurrency = 9\nauto_max_concurrency = 3",
    )
    .unwrap()
    .validate()
    .unwrap_err();
    assert!(bad.0.contains("auto_min_concurrency"), "{}", bad.0);
    let out = anteroom(&["serve", "--max-concurrency", "auto", "--listen", "bad"]);
    // The flag parses ("auto" accepted); the bad address is what fails.
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

#[test]
fn reservations_must_leave_room_for_other_work() {
    let ok = FileConfig::parse("max_concurrency = 4\n[[reserve]]\nmax_priority = 0\nslots = 1\n")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(ok.limits.reserved.len(), 1);
    let full = FileConfig::parse("max_concurrency = 2\n[[reserve]]\nmax_priority = 0\nslots = 2\n")
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(full.0.contains("reserve"), "{}", full.0);
    let out = anteroom(&[
        "serve",
        "--reserve",
        "-5:1",
        "--reserve",
        "zero",
        "--listen",
        "x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAX_PRIORITY:SLOTS"));
}

/// The server log written to a pipe or a file (a container runtime, `2>
/// log`) is plain text: no colour escape codes, which made it unreadable
/// in `less` and broke `grep`.
#[test]
fn the_log_is_plain_when_not_on_a_terminal() {
    use std::io::BufRead;
    let port = |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let (listen, admin) = (port(0), port(1));
    let mut child = Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .args(["serve", "--upstream", "http://127.0.0.1:9"])
        .args(["--listen", &listen, "--admin-listen", &admin])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let serving = line.contains("anteroom serving");
            let _ = tx.send(line);
            if serving {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(30)) {
        let serving = line.contains("anteroom serving");
        lines.push(line);
        if serving {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.last().is_some_and(|l| l.contains("anteroom serving")),
        "{lines:?}"
    );
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "an escape code: {line:?}");
        assert!(line.contains("INFO") || line.contains("WARN"), "{line:?}");
    }
}
