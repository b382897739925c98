//! The simulator's token stream: SSE events written on a timer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::time::Sleep;

use super::{InFlight, SimState, Slot};
use crate::BoxError;

/// One simulated generation.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) chat: bool,
    pub(crate) tokens: usize,
    pub(crate) prompt_tokens: usize,
    pub(crate) include_usage: bool,
    /// Per-request token interval (`sim_tokens_per_second` in the body).
    pub(crate) interval: Option<std::time::Duration>,
    /// Put the wall-clock send time in each chunk (`x_sent_ns`), so a client
    /// on the same machine can measure each event's delivery delay.
    pub(crate) stamp: bool,
    /// Put llama.cpp's `timings` in the last chunk / the body.
    pub(crate) timings: bool,
}

/// When a generation's phases happened, for llama.cpp's `timings`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Phases {
    /// It took its slot: prompt processing begins.
    pub(crate) started: tokio::time::Instant,
    /// The first token was out.
    pub(crate) first: tokio::time::Instant,
    /// The last token was out.
    pub(crate) last: tokio::time::Instant,
}

impl Completion {
    fn usage(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        }
    }

    fn choice(&self, text: &str, finish: Option<&str>) -> serde_json::Value {
        if self.chat {
            let delta = if text.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::json!({"content": text})
            };
            let mut c = serde_json::json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish});
            self.as_llama_chat(&mut c);
            c
        } else {
            serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        }
    }

    /// llama-server's chat choices carry no `logprobs` unless asked.
    fn as_llama_chat(&self, choice: &mut serde_json::Value) {
        if self.timings {
            if let Some(c) = choice.as_object_mut() {
                c.remove("logprobs");
            }
        }
    }

    /// The first chat chunk: the role with the first token, as OpenAI's.
    pub(crate) fn first_chat_choice(&self, text: &str) -> serde_json::Value {
        let mut c = serde_json::json!({"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": null});
        self.as_llama_chat(&mut c);
        c
    }

    fn chunk(&self, choices: serde_json::Value, usage: Option<serde_json::Value>) -> Bytes {
        let mut v = serde_json::json!({
            "id": format!("cmpl-sim-{}", self.id),
            "object": self.object(true),
            "created": 0,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        if self.stamp {
            let ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            v["x_sent_ns"] = ns.into();
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    /// llama.cpp's per-request `timings`, as its server writes them.
    pub(crate) fn timings(&self, at: Phases) -> serde_json::Value {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let prompt_ms = ms(at.first.duration_since(at.started));
        let predicted_ms = ms(at.last.duration_since(at.first));
        let per = |ms: f64, n: usize| if n == 0 { 0.0 } else { ms / n as f64 };
        let rate = |ms: f64, n: usize| {
            if ms <= 0.0 {
                0.0
            } else {
                n as f64 * 1000.0 / ms
            }
        };
        serde_json::json!({
            "cache_n": 0,
            "prompt_n": self.prompt_tokens,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": per(prompt_ms, self.prompt_tokens),
            "prompt_per_second": rate(prompt_ms, self.prompt_tokens),
            "predicted_n": self.tokens,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": per(predicted_ms, self.tokens),
            "predicted_per_second": rate(predicted_ms, self.tokens),
        })
    }

    /// The whole response of a non-streamed request, as JSON text.
    pub(crate) fn full_response(&self, at: Phases) -> String {
        let text: String = (0..self.tokens).map(token_text).collect();
        let choice = if self.chat {
            let mut c = serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"});
            self.as_llama_chat(&mut c);
            c
        } else {
            serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"})
        };
        let v = serde_json::json!({
            "id": format!("cmpl-sim-{}", self.id),
            "object": self.object(false),
            "created": 0,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        });
        if self.timings {
            return with_last_field(&v, "timings", &self.timings(at));
        }
        v.to_string()
    }
}

/// `v`'s JSON text with one more top-level field written after all the
/// others, as llama-server writes `timings` (serde_json would sort it in).
fn with_last_field(v: &serde_json::Value, key: &str, value: &serde_json::Value) -> String {
    let text = v.to_string();
    match text.strip_suffix('}') {
        Some(head) if head.ends_with('{') => format!("{head}\"{key}\":{value}}}"),
        Some(head) => format!("{head},\"{key}\":{value}}}"),
        None => text,
    }
}

/// An SSE `data:` event with one more top-level field, written last.
fn with_field(event: &Bytes, key: &str, value: serde_json::Value) -> Bytes {
    let json = event
        .strip_prefix(b"data: ")
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(j.trim_ascii()).ok());
    match json {
        Some(v) => Bytes::from(format!("data: {}\n\n", with_last_field(&v, key, &value))),
        None => event.clone(),
    }
}

fn token_text(i: usize) -> String {
    format!("tok{i} ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Tokens(usize),
    Finish,
    Usage,
    Done,
    End,
}

/// The SSE body: the first token after the time to first token, then one
/// token per interval, then the finish chunk, the usage chunk (if asked for)
/// and `[DONE]`. Dropping it early counts the request as cancelled.
pub(crate) struct SseBody {
    state: Arc<SimState>,
    completion: Completion,
    phase: Phase,
    sleep: Pin<Box<Sleep>>,
    /// False when the next frame is due at once (zero intervals skip the
    /// timer, which would round them up to a millisecond).
    waiting: bool,
    guard: InFlight,
    _slot: Option<Slot>,
    /// When the slot was taken, and the first token went out.
    started: tokio::time::Instant,
    first: Option<tokio::time::Instant>,
    last: Option<tokio::time::Instant>,
}

impl SseBody {
    pub(crate) fn new(
        state: Arc<SimState>,
        completion: Completion,
        guard: InFlight,
        slot: Slot,
    ) -> Self {
        let ttft = state.ttft();
        let sleep = Box::pin(tokio::time::sleep(ttft));
        let waiting = !ttft.is_zero();
        let phase = if completion.tokens == 0 {
            Phase::Finish
        } else {
            Phase::Tokens(0)
        };
        Self {
            state,
            completion,
            phase,
            sleep,
            waiting,
            guard,
            _slot: Some(slot),
            started: tokio::time::Instant::now(),
            first: None,
            last: None,
        }
    }
}

impl SseBody {
    /// llama.cpp puts its timings on the stream's last chunk (the usage
    /// chunk when one is asked for), written after its other fields.
    fn with_timings(&self, chunk: Bytes) -> Bytes {
        if !self.completion.timings {
            return chunk;
        }
        let now = tokio::time::Instant::now();
        let at = Phases {
            started: self.started,
            first: self.first.unwrap_or(now),
            last: self.last.unwrap_or(now),
        };
        with_field(&chunk, "timings", self.completion.timings(at))
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let data = match this.phase {
            Phase::Tokens(i) => {
                if this.waiting {
                    ready!(this.sleep.as_mut().poll(cx));
                }
                if this.state.cfg.die_after_tokens == Some(i) {
                    // Failing the body makes hyper abort the connection.
                    return Poll::Ready(Some(Err("simulated crash mid-stream".into())));
                }
                if this.state.cfg.stall_after_tokens == Some(i) {
                    // Never wakes: the stream hangs until its client leaves.
                    return Poll::Pending;
                }
                let now = tokio::time::Instant::now();
                this.first.get_or_insert(now);
                this.last = Some(now);
                // Two tokens in this event (every third, when pairing).
                let pair =
                    this.state.cfg.pair_tokens && i % 3 == 1 && i + 1 < this.completion.tokens;
                let text = if this.completion.chat && i == 0 {
                    // The first chat chunk carries the role too, as OpenAI's do.
                    let v = serde_json::json!([this.completion.first_chat_choice(&token_text(i))]);
                    this.completion.chunk(v, None)
                } else {
                    let mut t = token_text(i);
                    if pair {
                        t.push_str(&token_text(i + 1));
                    }
                    let c = this.completion.choice(&t, None);
                    this.completion.chunk(serde_json::json!([c]), None)
                };
                let i = if pair { i + 1 } else { i };
                this.phase = if i + 1 < this.completion.tokens {
                    let interval = this
                        .completion
                        .interval
                        .unwrap_or_else(|| this.state.token_interval());
                    this.waiting = !interval.is_zero();
                    if this.waiting {
                        this.sleep
                            .as_mut()
                            .reset(tokio::time::Instant::now() + interval);
                    }
                    Phase::Tokens(i + 1)
                } else {
                    Phase::Finish
                };
                text
            }
            Phase::Finish => {
                if this.waiting {
                    ready!(this.sleep.as_mut().poll(cx));
                }
                this.phase = if this.completion.include_usage {
                    Phase::Usage
                } else {
                    Phase::Done
                };
                let c = this.completion.choice("", Some("stop"));
                let chunk = this.completion.chunk(serde_json::json!([c]), None);
                if this.completion.include_usage {
                    chunk
                } else {
                    this.with_timings(chunk)
                }
            }
            Phase::Usage => {
                this.phase = Phase::Done;
                let chunk = this
                    .completion
                    .chunk(serde_json::json!([]), Some(this.completion.usage()));
                this.with_timings(chunk)
            }
            Phase::Done => {
                this.phase = Phase::End;
                this.guard.finish();
                this.state
                    .count_tokens(this.completion.prompt_tokens, this.completion.tokens);
                this._slot = None;
                Bytes::from_static(b"data: [DONE]\n\n")
            }
            Phase::End => return Poll::Ready(None),
        };
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.phase == Phase::End
    }
}
