//! Reading what a backend's own endpoints say: pure functions of a body,
//! each `None` for anything it does not recognise (garbage, HTML, a number
//! out of range), never a panic.

use crate::config::backend::Kind;

/// The most slots a backend may report before the number is taken as
/// garbage (llama-server's `--parallel` is a handful; vLLM's
/// `max_num_seqs` is hundreds).
pub(crate) const MAX_SLOTS: usize = 4096;

fn json(body: &[u8]) -> Option<serde_json::Value> {
    serde_json::from_slice(body).ok()
}

fn count(v: &serde_json::Value) -> Option<usize> {
    let n = v.as_u64()?;
    (1..=MAX_SLOTS as u64).contains(&n).then_some(n as usize)
}

/// llama.cpp's `GET /props`: `total_slots`.
pub(crate) fn props_slots(body: &[u8]) -> Option<usize> {
    count(json(body)?.get("total_slots")?)
}

/// llama.cpp's `GET /slots`: (slots, slots processing).
pub(crate) fn slots_busy(body: &[u8]) -> Option<(usize, usize)> {
    let v = json(body)?;
    let list = v.as_array()?;
    if list.is_empty() || list.len() > MAX_SLOTS {
        return None;
    }
    let mut busy = 0;
    for s in list {
        busy += usize::from(s.get("is_processing")?.as_bool()?);
    }
    Some((list.len(), busy))
}

/// The sum of every sample of `name` (any labels) in a Prometheus text
/// exposition; `None` when there is none or a value is not a count.
pub fn metric(text: &str, name: &str) -> Option<usize> {
    let mut sum: Option<f64> = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `{labels}` or white space follows.
        let rest = match rest.as_bytes().first() {
            Some(b'{') => match rest.find('}') {
                Some(end) => &rest[end + 1..],
                None => continue,
            },
            Some(b' ' | b'\t') => rest,
            _ => continue,
        };
        let value = rest.split_whitespace().next()?;
        let v: f64 = value.parse().ok()?;
        if !(0.0..=1e9).contains(&v) {
            return None;
        }
        *sum.get_or_insert(0.0) += v;
    }
    sum.map(|s| s.round() as usize)
}

/// What `/metrics` says the backend is, and its running and waiting counts.
pub fn metrics(text: &str) -> Option<(Kind, Option<usize>, Option<usize>)> {
    if let Some(running) = metric(text, "vllm:num_requests_running") {
        return Some((
            Kind::Vllm,
            Some(running),
            metric(text, "vllm:num_requests_waiting"),
        ));
    }
    let running = metric(text, "llamacpp:requests_processing");
    let waiting = metric(text, "llamacpp:requests_deferred");
    (running.is_some() || waiting.is_some()).then_some((Kind::LlamaCpp, running, waiting))
}

/// Ollama's `GET /api/version`: `{"version": "0.5.7"}`.
pub(crate) fn ollama_version(body: &[u8]) -> Option<String> {
    let v = json(body)?;
    let version = v.get("version")?.as_str()?;
    // Nothing else in the object: LM Studio and others answer other shapes.
    (v.as_object()?.len() == 1 && version.len() <= 64).then(|| version.to_owned())
}

/// LM Studio's `GET /api/v0/models`: a list whose entries carry `state`
/// (`loaded` / `not-loaded`). The number loaded.
pub(crate) fn lmstudio_loaded(body: &[u8]) -> Option<usize> {
    let v = json(body)?;
    let list = v.get("data")?.as_array()?;
    let mut loaded = 0;
    for m in list {
        loaded += usize::from(m.get("state")?.as_str()? == "loaded");
    }
    Some(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GARBAGE: &[&[u8]] = &[
        b"",
        b"<html><body>502 Bad Gateway</body></html>",
        b"{",
        b"null",
        b"[]",
        b"{\"total_slots\": -1}",
        b"{\"total_slots\": 0}",
        b"{\"total_slots\": 1e30}",
        b"{\"total_slots\": \"4\"}",
        b"{\"total_slots\": 99999999}",
        b"[{\"id\": 0}]",
        b"[{\"is_processing\": 1}]",
        b"\xff\xfe\x00",
    ];

    #[test]
    fn llama_cpp_props_and_slots() {
        assert_eq!(
            props_slots(br#"{"total_slots": 4, "build_info": "b1"}"#),
            Some(4)
        );
        assert_eq!(
            slots_busy(br#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]"#),
            Some((2, 1))
        );
        for g in GARBAGE {
            assert_eq!(props_slots(g), None, "{g:?}");
            assert_eq!(slots_busy(g), None, "{g:?}");
            assert_eq!(ollama_version(g), None, "{g:?}");
            assert_eq!(lmstudio_loaded(g), None, "{g:?}");
        }
    }

    #[test]
    fn metrics_by_name_summed_over_labels() {
        let vllm = "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 2.0\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 7.0\n\
            vllm:num_requests_waiting_by_reason{reason=\"capacity\"} 9.0\n";
        assert_eq!(metrics(vllm), Some((Kind::Vllm, Some(5), Some(7))));
        let llama = "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n\
            llamacpp:requests_deferred 3\n";
        assert_eq!(metrics(llama), Some((Kind::LlamaCpp, Some(1), Some(3))));
        for bad in [
            "",
            "<html>",
            "vllm:num_requests_running NaN\n",
            "vllm:num_requests_running -3\n",
            "vllm:num_requests_running{engine=\"0\" 3\n",
            "vllm:num_requests_running_total 3\n",
            "vllm:num_requests_running 1e300\n",
        ] {
            assert_eq!(metrics(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ollama_and_lm_studio() {
        assert_eq!(
            ollama_version(br#"{"version":"0.5.7"}"#).as_deref(),
            Some("0.5.7")
        );
        assert_eq!(ollama_version(br#"{"version":"1","object":"x"}"#), None);
        assert_eq!(
            lmstudio_loaded(br#"{"object":"list","data":[{"id":"a","state":"loaded"},{"id":"b","state":"not-loaded"}]}"#),
            Some(1)
        );
        assert_eq!(lmstudio_loaded(br#"{"data":[{"id":"a"}]}"#), None);
    }
}
