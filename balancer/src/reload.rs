//! Reloading the configuration while the balancer runs (`SIGHUP`).
//!
//! The binary ([`crate::cli`]) answers a SIGHUP by loading the config exactly as at start —
//! the same `--config` file, the same flags over it, the certificate files read again — and
//! hands the result to [`crate::run_with`], which [`apply`]s it here:
//!
//! - **It failed** (the file does not parse, a value is refused, a certificate or key is bad
//!   or they do not match): the running config stays, the reason is logged at warn, and
//!   `/status` shows `"reload":{"ok":false,"at":…,"error":…}`.
//! - **It loaded**: it replaces the live config whole (one `ArcSwap` store). New connections
//!   use it — its certificate, timeouts, header limits, `hash_keys`, signing key, and anything
//!   added to [`Config`] later — while established connections and tunnels keep what they
//!   took when they began. `/status` shows `"reload":{"ok":true,"at":…}`.
//!
//! Some settings cannot change in a running process: the addresses it listens on, its
//! threads, `SO_REUSEPORT`, `max_connections` (the connection semaphore and the descriptor
//! budget are sized once), the static node list (health checks and metrics are per node,
//! made at start) and the registry followed (`discover`), and whether the listener speaks
//! TLS at all (clients would break; the certificate itself does reload). When a reload changes one of those, the new value is *not* applied: the
//! running one is carried into the new config, so the live config always says what is in
//! force, and a warning names the setting as needing a restart (or an upgrade).
//!
//! A new [`Config`] field is live without anything here; one that needs a restart takes one
//! line in [`keep_restart_only`].

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tracing::{info, warn};

use crate::metrics::ReloadResult;
use crate::{Config, Error, Shared};

/// Freshly loaded configs, one per reload request (or the error loading it gave), for
/// [`crate::run_with`]. The binary sends one per SIGHUP.
pub type Reloads = tokio::sync::mpsc::Receiver<Result<Config, Error>>;

/// How the latest reload went, as `/status` shows it under `"reload"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub ok: bool,
    /// When it was tried, RFC 3339 UTC to the second.
    pub at: String,
    /// Why it failed; absent after a good one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Swaps `loaded` in as the live config, keeping the settings that need a restart, or keeps
/// the running config when loading failed; records the outcome for `/status` either way.
pub(crate) fn apply(shared: &Shared, loaded: Result<Config, Error>) {
    let at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let outcome = match loaded {
        Ok(mut config) => {
            let running = shared.config.load_full();
            for setting in keep_restart_only(&running, &mut config) {
                warn!(
                    setting,
                    "reload: {setting} changed, but that needs a restart (or an upgrade); keeping the running value"
                );
            }
            let tls = config.tls.as_ref().map(|tls| (tls.cert.display().to_string(), tls.key.display().to_string()));
            shared.config.store(Arc::new(config));
            match tls {
                Some((cert, key)) => info!(%cert, %key, "configuration reloaded; new connections use it"),
                None => info!("configuration reloaded; new connections use it"),
            }
            shared.metrics.reloaded(ReloadResult::ok);
            Outcome { ok: true, at, error: None }
        }
        Err(e) => {
            warn!(error = %e, "reload failed; keeping the running configuration");
            shared.metrics.reloaded(ReloadResult::failed);
            Outcome { ok: false, at, error: Some(e.to_string()) }
        }
    };
    *shared.reload.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(outcome);
}

/// Puts the running value of every setting that cannot change without a restart back into
/// `new`, and names those that differed. One line per such setting.
fn keep_restart_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! restart_only {
        ($($field:ident),* $(,)?) => {$(
            if running.$field != new.$field {
                kept.push(stringify!($field));
                new.$field = running.$field.clone();
            }
        )*};
    }
    restart_only!(listen, admin, threads, reuse_port, nodes, discover, max_connections);
    // Where `max_connections` came from goes with it (it was reported once, under that name).
    new.connection_limit = running.connection_limit;
    // TLS on or off is the listener's protocol; its certificate and key do reload.
    if running.tls.is_some() != new.tls.is_some() {
        kept.push("tls");
        new.tls = running.tls.clone();
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileConfig;

    fn config(extra: &str) -> Config {
        let text = format!("{extra}\n[[nodes]]\nname = \"a\"\naddr = \"127.0.0.1:9001\"\n");
        FileConfig::parse(&text).unwrap().validate().unwrap()
    }

    #[test]
    fn settings_that_need_a_restart_keep_their_running_value_and_are_named() {
        let running =
            config("listen = \"127.0.0.1:1000\"\nthreads = 2\nmax_connections = 10\nconnect_timeout_ms = 100");
        let mut new = config(
            "listen = \"127.0.0.1:2000\"\nthreads = 3\nmax_connections = 20\nconnect_timeout_ms = 200\nhash_keys = [\"header\"]",
        );
        let kept = keep_restart_only(&running, &mut new);
        assert_eq!(kept, ["listen", "threads", "max_connections"]);
        assert_eq!((new.listen, new.threads, new.max_connections), (running.listen, 2, 10));
        assert_eq!(new.connection_limit, running.connection_limit);
        // The live ones are the new file's.
        assert_eq!(new.connect_timeout.as_millis(), 200);
        assert_eq!(new.hash_keys.id_order, [tether_proto::id::IdSource::Header]);

        let mut same = config("listen = \"127.0.0.1:1000\"\nthreads = 2\nmax_connections = 10");
        assert!(keep_restart_only(&running, &mut same).is_empty());

        let mut other_nodes =
            FileConfig::parse("[[nodes]]\nname = \"b\"\naddr = \"127.0.0.1:9002\"\n").unwrap().validate().unwrap();
        assert!(keep_restart_only(&running, &mut other_nodes).contains(&"nodes"));
        assert_eq!(other_nodes.nodes, running.nodes);
    }

    #[test]
    fn an_outcome_shows_ok_and_at_and_an_error_only_when_it_failed() {
        let ok = Outcome { ok: true, at: "2026-01-01T00:00:00Z".into(), error: None };
        assert_eq!(serde_json::to_value(&ok).unwrap(), serde_json::json!({"ok": true, "at": "2026-01-01T00:00:00Z"}));
        let failed = Outcome { ok: false, at: "2026-01-01T00:00:00Z".into(), error: Some("bad".into()) };
        assert_eq!(serde_json::to_value(&failed).unwrap()["error"], "bad");
    }
}
