//! The README's first command: `anteroom demo` runs to its end and shows what
//! it claims to.

#[test]
fn the_demo_runs_and_shows_priority_report_and_reservation() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anteroom"))
        .arg("demo")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "max_concurrency 1 held",
        "`anteroom report --by priority`",
        "| all | queue wait |",
        "Reserved capacity",
        "Preemption",
        "Knowing the backend",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    // The figure before the unit at the end of the first line with `label`.
    let number = |label: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("no `{label}` line in\n{text}"));
        line.split_whitespace()
            .rev()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number in `{line}`"))
    };
    let priority_only = number("priority only");
    let reserved = number("1 slot reserved");
    // A reserved slot lets the interactive user past the running flood;
    // priority alone makes it wait for a flood stream to end.
    assert!(
        reserved < priority_only,
        "reserved {reserved} ms, priority only {priority_only} ms\n{text}"
    );
    // Preemption lets the interactive user past a running non-streamed
    // eval request, which otherwise holds the one slot for a second.
    let waited = number("no preemption");
    let preempted = number("preempt = true");
    assert!(
        preempted < waited,
        "preempted {preempted} ms, without {waited} ms\n{text}"
    );
    // A reserved slot idles without urgent work; lent out, it serves the
    // flood (one slot's worth of 40-token requests more).
    let idle = number("reserved for priority <= 0, idle");
    let lent = number("lent out");
    assert!(lent > idle * 1.5, "lent {lent}, idle {idle}\n{text}");
    // Discovery: the slots read from the backend, whose own queue stays
    // empty; a limit too high fills it.
    let line = |label: &str| {
        text.lines()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("no `{label}` line in\n{text}"))
    };
    let read = line("max_concurrency = \"backend\"");
    assert!(
        read.contains("identified llama.cpp with 3 slots; limit  3")
            && read.ends_with(" 0 waiting inside it"),
        "{read}"
    );
    let high = line("max_concurrency = 16");
    assert!(!high.ends_with(" 0 waiting inside it"), "{high}");
}
