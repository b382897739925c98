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
            serde_json::json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        }
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

    /// The whole response of a non-streamed request.
    pub(crate) fn full_response(&self) -> serde_json::Value {
        let text: String = (0..self.tokens).map(token_text).collect();
        let choice = if self.chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"})
        } else {
            serde_json::json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"})
        };
        serde_json::json!({
            "id": format!("cmpl-sim-{}", self.id),
            "object": self.object(false),
            "created": 0,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        })
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
        }
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
                let text = if this.completion.chat && i == 0 {
                    // The first chat chunk carries the role too, as OpenAI's do.
                    let v = serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": token_text(i)}, "logprobs": null, "finish_reason": null}]);
                    this.completion.chunk(v, None)
                } else {
                    let c = this.completion.choice(&token_text(i), None);
                    this.completion.chunk(serde_json::json!([c]), None)
                };
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
                this.completion.chunk(serde_json::json!([c]), None)
            }
            Phase::Usage => {
                this.phase = Phase::Done;
                this.completion
                    .chunk(serde_json::json!([]), Some(this.completion.usage()))
            }
            Phase::Done => {
                this.phase = Phase::End;
                this.guard.finish();
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
