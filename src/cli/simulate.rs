//! `anteroom simulate`.

use clap::Args;

use crate::config::parse_duration;
use crate::sim::{self, Mode, SimConfig};
use crate::BoxError;

/// Flags of `anteroom simulate`.
#[derive(Clone, Debug, Args)]
pub struct SimulateArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:1234", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// serial: one request at a time; batch: up to --slots at once; knee:
    /// everything at once, with a throughput knee at --slots; llama:
    /// llama-server --parallel SLOTS (/props, /slots, /metrics, timings);
    /// vllm: vLLM (its /metrics, --max-queued refusals).
    #[arg(long, value_enum, default_value = "serial")]
    pub mode: Mode,
    /// Concurrent requests (batch, llama, vllm), the knee (knee).
    #[arg(long, default_value_t = 8)]
    pub slots: usize,
    /// Time to first token.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub ttft: std::time::Duration,
    /// Output tokens per second of one request alone.
    #[arg(long, default_value_t = 100.0)]
    pub tokens_per_second: f64,
    /// Output tokens when a request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    pub output_tokens: usize,
    /// Batch mode: each other running request slows every token by this share.
    #[arg(long, default_value_t = 0.1)]
    pub batch_slowdown: f64,
    /// Model name.
    #[arg(long, default_value = "anteroom-sim")]
    pub model: String,
    /// Share of generation requests refused (0 to 1), like an overloaded
    /// backend.
    #[arg(long, default_value_t = 0.0)]
    pub reject_share: f64,
    /// Status of a refusal (429 or 503).
    #[arg(long, default_value_t = 429)]
    pub reject_status: u16,
    /// Retry-After sent with a refusal (none by default).
    #[arg(long, value_parser = parse_duration)]
    pub reject_retry_after: Option<std::time::Duration>,
    /// Streams: reset the connection after this many tokens.
    #[arg(long, value_name = "N")]
    pub die_after_tokens: Option<usize>,
    /// Streams: go silent after this many tokens.
    #[arg(long, value_name = "N")]
    pub stall_after_tokens: Option<usize>,
    /// Refuse generation requests while this many are running.
    #[arg(long, value_name = "N")]
    pub reject_over: Option<usize>,
    /// Share of new connections closed at once (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub refuse_connections: f64,
    /// Put each SSE chunk's wall-clock send time in it (`x_sent_ns`).
    #[arg(long)]
    pub stamp_events: bool,
    /// Close every connection after its response (as llama.cpp's server).
    #[arg(long)]
    pub close_after_response: bool,
    /// Share of responses after which the idle connection is closed 0-50 ms
    /// later.
    #[arg(long, default_value_t = 0.0)]
    pub close_idle_share: f64,
    /// llama mode: answer /metrics with 501, as llama-server without
    /// --metrics does.
    #[arg(long)]
    pub no_metrics: bool,
    /// vllm mode: refuse with 503 once this many run and wait
    /// (--max-num-queued-reqs).
    #[arg(long, value_name = "N")]
    pub max_queued: Option<usize>,
    /// vllm mode: a refused stream gets 200 with one SSE error event.
    #[arg(long)]
    pub sse_refusal: bool,
    /// Streams: every third token event carries two tokens (as
    /// llama-server sometimes writes them).
    #[arg(long)]
    pub pair_tokens: bool,
    /// A generation for another model than --model is a 404 (as vLLM
    /// answers a name it does not serve).
    #[arg(long)]
    pub only_model: bool,
    /// Answer every POST badly, in this way (a broken or hostile backend,
    /// for testing what anteroom does with it); the other flags are unused.
    #[arg(long, value_enum, value_name = "KIND")]
    pub hostile: Option<sim::hostile::Hostile>,
}

impl SimulateArgs {
    /// The simulator config.
    pub fn sim_config(&self) -> SimConfig {
        SimConfig {
            mode: self.mode,
            slots: self.slots,
            ttft: self.ttft,
            tokens_per_second: self.tokens_per_second,
            output_tokens: self.output_tokens,
            batch_slowdown: self.batch_slowdown,
            model: self.model.clone(),
            reject_share: self.reject_share,
            reject_status: self.reject_status,
            reject_retry_after: self.reject_retry_after,
            die_after_tokens: self.die_after_tokens,
            stall_after_tokens: self.stall_after_tokens,
            reject_over: self.reject_over,
            refuse_connections: self.refuse_connections,
            stamp_events: self.stamp_events,
            close_after_response: self.close_after_response,
            close_idle_share: self.close_idle_share,
            metrics: !self.no_metrics,
            max_queued: self.max_queued,
            sse_refusal: self.sse_refusal,
            pair_tokens: self.pair_tokens,
            only_model: self.only_model,
        }
    }
}

/// Run until SIGINT or SIGTERM.
pub async fn run(args: SimulateArgs) -> Result<(), BoxError> {
    if let Some(kind) = args.hostile {
        let handle = sim::hostile::start(args.listen, kind).await?;
        tracing::info!(listen = %handle.addr, ?kind, "hostile simulator serving");
        super::shutdown_signal().await;
        return Ok(());
    }
    let handle = sim::start(args.listen, args.sim_config()).await?;
    tracing::info!(listen = %handle.addr, mode = ?args.mode, "simulator serving");
    super::shutdown_signal().await;
    Ok(())
}
