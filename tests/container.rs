//! What can be checked of the container image without a container engine:
//! the Dockerfile builds with CI's cargo command and has the shape the
//! brief asks for, the compose example wires the sidecar, and the release
//! binary runs with an empty environment (`env -i`) against the config the
//! image carries, answers its own HEALTHCHECK, logs JSON and drains on
//! SIGTERM.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anteroom::sim::Mode;
use support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `cargo build …` line of a script or Dockerfile.
fn cargo_build_line(text: &str) -> String {
    let at = text
        .find("cargo build")
        .unwrap_or_else(|| panic!("no cargo build in:\n{text}"));
    text[at..]
        .split(['\n', '&'])
        .next()
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn the_dockerfile_builds_like_ci_and_runs_unprivileged() {
    let docker = read("Dockerfile");
    let ci = read(".ci/run");
    assert_eq!(cargo_build_line(&docker), cargo_build_line(&ci));
    assert_eq!(cargo_build_line(&ci), "cargo build --release --locked");
    let froms = docker.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(froms, 2, "multi-stage: a build and a runtime stage");
    assert!(docker.contains("USER nonroot"), "runs as a non-root user");
    assert!(docker.contains("EXPOSE 8080 8081"));
    assert!(docker.contains("HEALTHCHECK") && docker.contains("\"healthcheck\""));
    assert!(docker.contains("/etc/anteroom/anteroom.toml"));
    // The config the image carries is valid and listens where it exposes.
    let cfg = anteroom::app::read_config(&root().join("deploy/anteroom.toml"))
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(cfg.listen.port(), 8080);
    assert_eq!(cfg.admin_listen.port(), 8081);
    let compose = read("deploy/compose.yaml");
    for needle in [
        "vllm/vllm-openai",
        "./anteroom.toml:/etc/anteroom/anteroom.toml",
        "8080:8080",
        "stop_grace_period",
    ] {
        assert!(compose.contains(needle), "compose.yaml lacks {needle}");
    }
    assert!(cfg.drain_timeout < std::time::Duration::from_secs(60));
    // The two-replica example: a valid config with [cluster], mounted by
    // both replicas, Redis beside them.
    let cluster = anteroom::app::read_config(&root().join("deploy/cluster.toml"))
        .unwrap()
        .validate()
        .unwrap();
    assert!(cluster.cluster.is_some());
    assert_eq!(cluster.listen.port(), 8080);
    let compose = read("deploy/compose.cluster.yaml");
    assert_eq!(
        compose
            .matches("./cluster.toml:/etc/anteroom/anteroom.toml")
            .count(),
        2
    );
    assert!(compose.contains("image: redis:7"), "Redis beside them");
    assert!(cluster.drain_timeout < std::time::Duration::from_secs(60));
}

/// The release binary (built here if CI has not built it yet: `cargo build
/// --release --locked` is a no-op when it is up to date).
fn release_binary() -> PathBuf {
    let built = Command::new(env!("CARGO"))
        .args(["build", "--release", "--locked", "--bin", "anteroom"])
        .current_dir(root())
        .status()
        .unwrap();
    assert!(built.success(), "cargo build --release failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    target.join("release").join("anteroom")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_binary_runs_with_an_empty_environment() {
    let bin = release_binary();
    let sim = sim(sim_config(Mode::Batch)).await;
    let (port, admin) = (free_port(), free_port());
    // The image's config, with the addresses moved to loopback: flags
    // override the file, as in `docker run … serve --listen …`.
    let child = Command::new("env")
        .arg("-i")
        .arg(&bin)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(root().join("deploy/anteroom.toml"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--upstream", &sim.url()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Proc {
        child,
        url: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin}"),
    };
    // The image's HEALTHCHECK, also under an empty environment.
    let health = format!("{}/healthz", proc.admin);
    let mut healthy = false;
    for _ in 0..300 {
        let s = Command::new("env")
            .arg("-i")
            .arg(&bin)
            .args(["healthcheck", "--url", &health, "--timeout", "1s"])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if s.success() {
            healthy = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(healthy, "healthcheck never passed");
    let resp = chat(&client(), &proc.url, None, "env-i", false, 2).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;

    proc.terminate();
    let out = tokio::task::spawn_blocking(move || {
        let status = proc.child.wait().unwrap();
        let mut stderr = String::new();
        use std::io::Read;
        proc.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status, stderr)
    })
    .await
    .unwrap();
    assert!(out.0.success(), "exit after SIGTERM: {}", out.0);
    // Every server log line is one JSON object, and none is per request.
    let lines: Vec<&str> = out.1.lines().collect();
    assert!(lines.len() >= 2, "{}", out.1);
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
        assert!(!l.contains("env-i"), "a request in the server log: {l}");
    }
    assert!(out.1.contains("anteroom serving") && out.1.contains("stopped"));

    // And the healthcheck fails once nothing answers.
    let s = Command::new(&bin)
        .args(["healthcheck", "--url", &health, "--timeout", "1s"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!s.success());
}
