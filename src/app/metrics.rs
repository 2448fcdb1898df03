//! The config's metric families ([`ConfigMetrics`]): the config in force, its reloads and how the
//! last one went, and when each TLS listener's certificate ends: what an operator checks after
//! changing files, and what the certificate alert reads. The app records them at start and at
//! every reload (of the config, or of the certificates alone).

use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{MetricSet, OutcomeLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// The first 16 hex digits of the SHA-256 of the config file's text (never of a secret).
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

/// What the app counts of its config.
pub struct ConfigMetrics {
    info: Family<ConfigLabels, Gauge>,
    /// `ok` or `rejected`.
    reloads: Family<OutcomeLabels, Counter>,
    last_reload_successful: Gauge,
    last_reload_timestamp: Gauge,
    certificate_expiry: Family<ListenerLabels, Gauge>,
}

impl MetricSet for ConfigMetrics {
    fn register(registry: &mut Registry) -> ConfigMetrics {
        let metrics = ConfigMetrics {
            info: Family::default(),
            reloads: Family::default(),
            last_reload_successful: Gauge::default(),
            last_reload_timestamp: Gauge::default(),
            certificate_expiry: Family::default(),
        };
        for outcome in ["ok", "rejected"] {
            let _ = metrics.reloads.get_or_create(&OutcomeLabels { outcome });
        }
        metrics.last_reload_successful.set(1);
        metrics
            .last_reload_timestamp
            .set(unix_seconds(SystemTime::now()));
        registry.register(
            "config_info",
            "The config file in force, by the SHA-256 of its text (first 16 hex digits); always 1",
            metrics.info.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome",
            metrics.reloads.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 if the last config or certificate reload was applied (or none was tried), 0 if refused",
            metrics.last_reload_successful.clone(),
        );
        registry.register(
            "config_last_reload_timestamp_seconds",
            "When the config was loaded or a reload last tried, Unix seconds",
            metrics.last_reload_timestamp.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the certificate a TLS listener serves ends (its notAfter), Unix seconds",
            metrics.certificate_expiry.clone(),
        );
        metrics
    }
}

impl ConfigMetrics {
    /// The config file whose text hashes to `sha256` is in force (at start or after a reload).
    pub fn in_force(&self, sha256: &[u8; 32]) {
        self.info.clear();
        let sha256 = hex::encode(&sha256[..8]);
        self.info.get_or_create(&ConfigLabels { sha256 }).set(1);
    }

    /// A reload (of the config, or of the certificates alone) was applied or refused, now.
    pub fn reloaded(&self, applied: bool) {
        let outcome = if applied { "ok" } else { "rejected" };
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
        self.last_reload_successful.set(i64::from(applied));
        self.last_reload_timestamp
            .set(unix_seconds(SystemTime::now()));
    }

    /// The certificate `listener` serves from now on ends at `not_after`.
    pub fn certificate(&self, listener: &str, not_after: SystemTime) {
        let labels = ListenerLabels {
            listener: listener.to_string(),
        };
        self.certificate_expiry
            .get_or_create(&labels)
            .set(unix_seconds(not_after));
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
