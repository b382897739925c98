//! `backend`: what kind of model server an upstream is, as configured.

use serde::{Deserialize, Serialize};

/// A kind of model server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// llama.cpp's `llama-server` (LM Studio's engine, among others).
    LlamaCpp,
    /// vLLM.
    Vllm,
    /// Ollama.
    Ollama,
    /// LM Studio.
    LmStudio,
    /// Any other OpenAI-compatible server: nothing to read.
    OpenAi,
}

impl Kind {
    /// Its name in the config, `/status` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::LlamaCpp => "llama.cpp",
            Kind::Vllm => "vllm",
            Kind::Ollama => "ollama",
            Kind::LmStudio => "lmstudio",
            Kind::OpenAi => "openai",
        }
    }

    /// Every kind, in the order of their index.
    pub const ALL: [Kind; 5] = [
        Kind::LlamaCpp,
        Kind::Vllm,
        Kind::Ollama,
        Kind::LmStudio,
        Kind::OpenAi,
    ];
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `backend` in the config: find out, or take the user's word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Setting {
    /// Identify it from its endpoints.
    #[default]
    Auto,
    /// It is this kind (`openai`: read nothing).
    Is(Kind),
}

impl std::str::FromStr for Setting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Setting::Auto);
        }
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .map(Setting::Is)
            .ok_or_else(|| {
                format!("`{s}` is not one of \"auto\", \"llama.cpp\", \"vllm\", \"ollama\", \"lmstudio\", \"openai\"")
            })
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Auto => f.write_str("auto"),
            Setting::Is(k) => f.write_str(k.as_str()),
        }
    }
}

impl Serialize for Setting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Setting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
