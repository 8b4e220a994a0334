//! Every metric the broker exports, in one table: its name, kind, unit,
//! labels and help text. [`describe`] registers the help text with the
//! recorder, so `/metrics` carries `# HELP` and `# TYPE` for each.
//!
//! The metrics themselves are recorded where things happen, with the
//! `metrics` macros and these names; a unit test reads the broker's sources
//! and fails if a name is recorded that the table lacks or the table lists
//! one nothing records, so the table, `/metrics` and `docs/operations.md`
//! cannot drift apart. Names follow Prometheus's conventions: counters end
//! in `_total`, and a quantity with a unit names it in base units
//! (`_seconds`, `_bytes`).
//!
//! Process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`,
//! `process_start_time_seconds`, ...) come from the `metrics-process`
//! collector, sampled on each scrape (see `metrics_http`).

use metrics::Unit;

/// What kind of metric a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; a rate is taken of it.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observations, in buckets.
    Histogram,
}

/// One exported metric.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// The Prometheus name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The unit of its values.
    pub unit: Unit,
    /// Its label names (values are bounded: codes, reasons, fleet node ids).
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn counter(
    name: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        unit: Unit::Count,
        labels,
        help,
    }
}

const fn bytes_counter(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        unit: Unit::Bytes,
        labels: &[],
        help,
    }
}

const fn gauge(
    name: &'static str,
    unit: Unit,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind: Kind::Gauge,
        unit,
        labels,
        help,
    }
}

const fn histogram(
    name: &'static str,
    unit: Unit,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram,
        unit,
        labels,
        help,
    }
}

/// Every metric the broker records, sorted by name.
pub const METRICS: &[Metric] = &[
    counter(
        "backbone_acks_received_total",
        &[],
        "Ack frames received from devices; each is cumulative and may cover many envelopes (clients gather their acks for a moment).",
    ),
    gauge(
        "backbone_anonymous_sessions",
        Unit::Count,
        &[],
        "Anonymous sessions open now (sealed sends, card lookups, token fetches, downloads).",
    ),
    counter(
        "backbone_capabilities_registered_total",
        &[],
        "Delivery capability hashes registered with a mailbox.",
    ),
    counter(
        "backbone_capabilities_revoked_total",
        &[],
        "Delivery capability hashes revoked.",
    ),
    gauge(
        "backbone_connections",
        Unit::Count,
        &[],
        "QUIC connections open now, authenticated or not.",
    ),
    counter(
        "backbone_connections_closed_total",
        &["reason"],
        "Connections the broker closed, by reason (output_stalled: the client stopped reading).",
    ),
    counter(
        "backbone_connections_refused_total",
        &["reason"],
        "Connections refused, by reason: connections (limits.max_connections), unauthenticated, source_unauthenticated, source_rate, anonymous, source_anonymous.",
    ),
    counter(
        "backbone_consent_refusals_total",
        &[],
        "Envelopes refused because the recipient accepts only identities it has a relationship with.",
    ),
    gauge(
        "backbone_data_dir_available_bytes",
        Unit::Bytes,
        &[],
        "Bytes available to the broker on the data directory's file system, sampled at each scrape.",
    ),
    gauge(
        "backbone_data_dir_size_bytes",
        Unit::Bytes,
        &[],
        "Size of the data directory's file system, sampled at each scrape.",
    ),
    histogram(
        "backbone_device_push_lag_envelopes",
        Unit::Count,
        &[],
        "Envelopes stored for a connected device and not yet acknowledged by it, observed at each acknowledgement.",
    ),
    counter(
        "backbone_devices_registered_total",
        &[],
        "Device certificates registered (a re-registration counts again).",
    ),
    counter(
        "backbone_devices_unregistered_total",
        &[],
        "Devices removed by their identity.",
    ),
    counter(
        "backbone_envelopes_accepted_total",
        &[],
        "Envelope copies stored durably for a recipient (one per recipient of a send).",
    ),
    counter(
        "backbone_envelopes_acked_total",
        &[],
        "Pushed envelopes acknowledged by devices.",
    ),
    counter(
        "backbone_envelopes_deleted_total",
        &[],
        "Envelopes deleted by their mailbox's owner.",
    ),
    counter(
        "backbone_envelopes_expired_total",
        &[],
        "Envelopes removed because their time to live ran out.",
    ),
    counter(
        "backbone_envelopes_pushed_total",
        &[],
        "Envelopes pushed to devices (redeliveries after a reconnect included).",
    ),
    counter(
        "backbone_errors_total",
        &["code"],
        "Error frames and error closes the broker sent, by protocol error code name.",
    ),
    counter(
        "backbone_file_downloads_refused_total",
        &[],
        "Downloads refused for a wrong secret.",
    ),
    bytes_counter(
        "backbone_file_received_bytes_total",
        "File bytes received from uploads.",
    ),
    bytes_counter(
        "backbone_file_sent_bytes_total",
        "File bytes sent to downloads.",
    ),
    counter(
        "backbone_file_uploads_mismatched_total",
        &[],
        "Uploads discarded because the bytes did not match the declared content hash.",
    ),
    counter(
        "backbone_files_completed_total",
        &[],
        "Files whose upload completed and verified.",
    ),
    counter("backbone_files_created_total", &[], "Files announced."),
    counter(
        "backbone_files_deleted_total",
        &[],
        "Files deleted by their owner.",
    ),
    counter(
        "backbone_files_expired_total",
        &[],
        "Files removed because their time to live ran out.",
    ),
    gauge(
        "backbone_fleet_epoch",
        Unit::Count,
        &[],
        "The epoch of the fleet map this node routes by.",
    ),
    histogram(
        "backbone_fleet_forward_seconds",
        Unit::Seconds,
        &["peer"],
        "Time from forwarding an envelope to a peer node until its answer, by peer node id.",
    ),
    counter(
        "backbone_fleet_forwards_received_total",
        &[],
        "Envelopes peer nodes forwarded to this node for recipients it owns.",
    ),
    counter(
        "backbone_fleet_forwards_sent_total",
        &["peer"],
        "Sends forwarded to the peer node that owns their recipients, counted when attempted, by peer node id.",
    ),
    bytes_counter(
        "backbone_fleet_handoff_file_sent_bytes_total",
        "File bytes sent to peer nodes while handing over slots.",
    ),
    counter(
        "backbone_fleet_handoff_transfers_received_total",
        &[],
        "Mailbox transfers imported from peer nodes handing over slots (a large mailbox counts once per 2 MiB part).",
    ),
    counter(
        "backbone_fleet_handoff_transfers_sent_total",
        &[],
        "Mailbox transfers acknowledged by a new owner (a large mailbox counts once per 2 MiB part; a retried handover counts again).",
    ),
    gauge(
        "backbone_fleet_handoffs_unfinished",
        Unit::Count,
        &[],
        "Slot handoffs of the current fleet map this node has not finished (sending or importing), sampled at each scrape.",
    ),
    gauge(
        "backbone_fleet_link_up",
        Unit::Count,
        &["peer"],
        "1 while the link to a peer node is up, 0 while it is down, by peer node id.",
    ),
    gauge(
        "backbone_fleet_slots_owned",
        Unit::Count,
        &[],
        "Address slots (of 4096) this node owns in the fleet map.",
    ),
    counter(
        "backbone_handshakes_failed_total",
        &["reason"],
        "Connections that never became a session, by reason: timeout (QUIC handshake not complete by auth.deadline), tls, auth_timeout, refused (a failed Auth, or a refused Anonymous).",
    ),
    counter(
        "backbone_identities_purged_total",
        &[],
        "Identity deletions completed (every peer told).",
    ),
    counter(
        "backbone_identity_deletions_cancelled_total",
        &[],
        "Scheduled identity deletions cancelled by the identity.",
    ),
    counter(
        "backbone_identity_deletions_scheduled_total",
        &[],
        "Identity deletions asked for, repeats included.",
    ),
    histogram(
        "backbone_log_batch_bytes",
        Unit::Bytes,
        &[],
        "Bytes written to the mailbox log by one group-commit batch (one write and one fdatasync).",
    ),
    gauge(
        "backbone_log_bytes",
        Unit::Bytes,
        &[],
        "Bytes the mailbox log's segment files take, preallocated space included.",
    ),
    counter(
        "backbone_log_checkpoints_total",
        &[],
        "Checkpoints of the mailbox log's index.",
    ),
    counter(
        "backbone_log_records_appended_total",
        &[],
        "Envelope records appended to the mailbox log.",
    ),
    counter(
        "backbone_log_records_moved_total",
        &[],
        "Live records copied forward by compaction.",
    ),
    counter(
        "backbone_log_segments_compacted_total",
        &[],
        "Segments whose live records compaction copied forward.",
    ),
    counter(
        "backbone_log_segments_created_total",
        &[],
        "Segment files created.",
    ),
    counter(
        "backbone_log_segments_deleted_total",
        &[],
        "Segment files deleted because nothing in them was live.",
    ),
    histogram(
        "backbone_log_sync_seconds",
        Unit::Seconds,
        &[],
        "Time of one write and fdatasync of the mailbox log; sends are acknowledged after it.",
    ),
    gauge(
        "backbone_mailbox_actors",
        Unit::Count,
        &[],
        "Mailbox actors running now.",
    ),
    gauge(
        "backbone_mailbox_watches",
        Unit::Count,
        &[],
        "Mailboxes with an actor or a connected device (a small record each; it falls back as devices disconnect).",
    ),
    histogram(
        "backbone_push_delay_seconds",
        Unit::Seconds,
        &[],
        "Time from storing an envelope to pushing it to a device.",
    ),
    gauge(
        "backbone_push_pending_envelopes",
        Unit::Count,
        &[],
        "Envelopes stored for connected devices and not yet acknowledged by them, summed over devices.",
    ),
    counter(
        "backbone_quic_retries_total",
        &["reason"],
        "New connections asked to answer a QUIC Retry first (address validation), by reason: rate, unauthenticated, source.",
    ),
    counter(
        "backbone_quota_refusals_total",
        &[],
        "Envelopes refused because the recipient's mailbox is full.",
    ),
    counter(
        "backbone_redirects_total",
        &[],
        "Clients redirected to the node that owns their address or file.",
    ),
    counter(
        "backbone_relationship_changes_total",
        &["state"],
        "Relationship changes applied, by the new state.",
    ),
    counter(
        "backbone_sealed_envelopes_stored_total",
        &[],
        "Sealed envelopes stored, counted on the recipient's node.",
    ),
    counter(
        "backbone_sealed_refused_total",
        &["reason"],
        "Sealed sends refused, by reason: unknown_capability, capability_rate (on the recipient's node), connection_rate (on the sender's node).",
    ),
    histogram(
        "backbone_send_seconds",
        Unit::Seconds,
        &["kind"],
        "Time from reading a send (kind send or sealed) to its answer: the envelope stored durably for every recipient, forwards to peer nodes included, or refused.",
    ),
    counter(
        "backbone_sends_refused_total",
        &["kind", "code"],
        "Envelope copies refused, by kind (send, sealed) and protocol error code name: a refused request counts once, and so does each recipient listed as failed.",
    ),
    gauge(
        "backbone_sessions",
        Unit::Count,
        &[],
        "Authenticated sessions open now.",
    ),
    gauge(
        "backbone_store_bytes",
        Unit::Bytes,
        &[],
        "Bytes the directory store (sled) takes on disk, sampled at each scrape.",
    ),
    histogram(
        "backbone_store_flush_seconds",
        Unit::Seconds,
        &[],
        "Time of one flush of the directory store (sled's flush and the fdatasync after it).",
    ),
    counter("backbone_tokens_created_total", &[], "Tokens created."),
    counter(
        "backbone_tokens_deleted_total",
        &[],
        "Tokens deleted by their owner.",
    ),
    counter(
        "backbone_tokens_expired_total",
        &[],
        "Tokens removed because their time to live ran out.",
    ),
    counter(
        "backbone_tokens_fetched_total",
        &[],
        "Tokens fetched, counted on the token's node.",
    ),
    counter(
        "backbone_tokens_refused_total",
        &["reason"],
        "Token requests refused, by reason: too_large, quota, not_found, wrong_password, locked.",
    ),
    gauge(
        "backbone_tokio_tasks",
        Unit::Count,
        &[],
        "Tokio tasks alive in the broker's runtime, sampled at each scrape; flat under steady load (a leak of sessions, pushers or timers shows here first).",
    ),
];

/// Histogram buckets for durations, in seconds: 50 µs to 2.5 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// Histogram buckets for sizes in bytes: 1 KiB to 16 MiB.
pub const BYTES_BUCKETS: &[f64] = &[
    1024.0,
    4096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
];

/// Histogram buckets for counts of envelopes: 0 to 100,000.
pub const COUNT_BUCKETS: &[f64] = &[
    0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16_384.0, 100_000.0,
];

/// Registers every metric's help text and unit with the installed recorder.
pub fn describe() {
    for metric in METRICS {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.unit, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.unit, metric.help),
            Kind::Histogram => {
                metrics::describe_histogram!(metric.name, metric.unit, metric.help)
            }
        }
    }
}

/// The Markdown table of every metric, as `docs/operations.md` shows it.
pub fn markdown_table() -> String {
    let mut table = String::from("| metric | kind | meaning |\n|---|---|---|\n");
    for metric in METRICS {
        let kind = match metric.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let labels = if metric.labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", metric.labels.join(","))
        };
        table.push_str(&format!(
            "| `{}{labels}` | {kind} | {} |\n",
            metric.name, metric.help
        ));
    }
    table
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;

    /// Every `counter!`, `gauge!` and `histogram!` in the broker's sources,
    /// by name: the kind and the label names it is recorded with.
    fn recorded() -> BTreeMap<String, (Kind, Vec<String>)> {
        let mut found: BTreeMap<String, (Kind, Vec<String>)> = BTreeMap::new();
        let mut files = Vec::new();
        collect_sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read a source file");
            for (macro_name, kind) in [
                ("counter!(", Kind::Counter),
                ("gauge!(", Kind::Gauge),
                ("histogram!(", Kind::Histogram),
            ] {
                for (at, _) in text.match_indices(macro_name) {
                    let call = &text[at + macro_name.len()..];
                    let call = &call[..call.find(')').unwrap_or(call.len())];
                    let mut strings = call.split('"').skip(1).step_by(2);
                    let Some(name) = strings.next() else {
                        panic!("{}: a {macro_name} without a literal name", file.display())
                    };
                    if !name.starts_with("backbone_") {
                        continue;
                    }
                    // Label names are the literals right before each `=>`.
                    let pieces: Vec<&str> = call.split("=>").collect();
                    let labels: Vec<String> = pieces[..pieces.len() - 1]
                        .iter()
                        .filter_map(|before| before.rsplit('"').nth(1))
                        .map(str::to_owned)
                        .collect();
                    let entry = found
                        .entry(name.to_owned())
                        .or_insert_with(|| (kind, labels.clone()));
                    assert_eq!(entry.0, kind, "{name} is recorded as two kinds");
                    if !labels.is_empty() || entry.1.is_empty() {
                        assert_eq!(
                            entry.1,
                            labels,
                            "{name} is recorded with two label sets ({})",
                            file.display()
                        );
                    }
                }
            }
        }
        found
    }

    fn collect_sources(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read the source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                collect_sources(&path, files);
            } else if path.extension().is_some_and(|ext| ext == "rs")
                && !path.ends_with("telemetry.rs")
            {
                files.push(path);
            }
        }
    }

    #[test]
    fn the_table_lists_exactly_what_the_sources_record() {
        let recorded = recorded();
        let listed: BTreeMap<&str, &Metric> = METRICS.iter().map(|m| (m.name, m)).collect();
        assert_eq!(listed.len(), METRICS.len(), "a name is listed twice");
        for (name, (kind, labels)) in &recorded {
            let metric = listed
                .get(name.as_str())
                .unwrap_or_else(|| panic!("{name} is recorded but not in telemetry::METRICS"));
            assert_eq!(metric.kind, *kind, "{name}'s kind");
            assert_eq!(metric.labels, labels.as_slice(), "{name}'s labels");
        }
        for name in listed.keys() {
            assert!(
                recorded.contains_key(*name),
                "{name} is in telemetry::METRICS but nothing records it"
            );
        }
    }

    #[test]
    fn names_follow_the_prometheus_conventions() {
        let names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "keep METRICS sorted by name");
        for metric in METRICS {
            let name = metric.name;
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name} is not snake_case"
            );
            assert_eq!(
                metric.kind == Kind::Counter,
                name.ends_with("_total"),
                "{name}: counters, and only counters, end in _total"
            );
            let base = name.trim_end_matches("_total");
            match metric.unit {
                Unit::Seconds => assert!(base.ends_with("_seconds"), "{name} needs _seconds"),
                Unit::Bytes => assert!(base.ends_with("_bytes"), "{name} needs _bytes"),
                _ => assert!(
                    !base.ends_with("_seconds") && !base.ends_with("_bytes"),
                    "{name} names a unit it is not described with"
                ),
            }
            assert!(
                metric.help.ends_with('.') && metric.help.len() > 10,
                "{name} needs a help sentence"
            );
        }
    }

    #[test]
    fn operations_md_shows_the_table() {
        const BEGIN: &str = "<!-- metrics:begin -->";
        const END: &str = "<!-- metrics:end -->";
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
        let document = std::fs::read_to_string(&path).expect("read docs/operations.md");
        let start = document
            .find(BEGIN)
            .expect("operations.md has the begin marker")
            + BEGIN.len();
        let end = start + document[start..].find(END).expect("and the end marker");
        let wanted = format!("\n{}", markdown_table());
        if document[start..end] == wanted {
            return;
        }
        if std::env::var_os("UPDATE_DOCS").is_some_and(|value| value == "1") {
            let updated = format!("{}{wanted}{}", &document[..start], &document[end..]);
            std::fs::write(&path, updated).expect("write docs/operations.md");
            return;
        }
        panic!(
            "docs/operations.md's metric table is stale; regenerate it with\n  \
             UPDATE_DOCS=1 cargo test -p backbone-broker --lib telemetry"
        );
    }
}
