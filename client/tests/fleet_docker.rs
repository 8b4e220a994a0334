//! Fault tests on a real three-node fleet in Docker (`docker/compose.yaml`):
//! a node killed, a node cut off the network, and a rolling restart, each
//! under steady traffic, each checked for lost, duplicated and unexpected
//! messages.
//!
//! They need Docker and take about a minute each, so they are ignored by
//! default. Run them with `scripts/fleet-test`, that is
//!
//! ```text
//! cargo test -p backbone-client --test fleet_docker -- --ignored --test-threads=1
//! ```
//!
//! One at a time: every test's fleet publishes the same host ports. The
//! image is built once per run (see `docker::image`); set
//! `BACKBONE_TEST_IMAGE` to run an existing image instead. Each test prints
//! its counts; the nodes' logs are saved under the target tmpdir.
//!
//! Layout:
//! - `docker`: the compose project, `/health`, faults, teardown.
//! - `traffic`: senders and recipients, the outcome of every copy.
//! - `check`: the ledger and the verdict (with its own unit tests, which
//!   run without Docker).

#[path = "fleet_docker/check.rs"]
mod check;
#[path = "fleet_docker/docker.rs"]
mod docker;
mod support;
#[path = "fleet_docker/traffic.rs"]
mod traffic;

use std::time::Duration;

use docker::{DockerFleet, NODES, report};
use tokio::time::Instant;
use traffic::{Outcome, Traffic};

/// Traffic before the fault.
const WARM_UP: Duration = Duration::from_secs(4);
/// How long a fault lasts.
const FAULT: Duration = Duration::from_secs(10);
/// Traffic after the fleet is whole again.
const AFTER: Duration = Duration::from_secs(5);
/// Longest wait for the fleet to be healthy with every link up.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// Longest drain. A client whose node was killed notices only at QUIC's
/// idle timeout: 30 s after the last packet it received, or after the next
/// keep-alive it sent (every 10 s), so up to 40 s after the kill, even when
/// the node has long been back (its new process cannot reset the old
/// connection). The drain starts about 25 s after the kill.
const DRAIN_LIMIT: Duration = Duration::from_secs(45);

/// "between 1.0s and 2.0s", from the first and last client to notice.
fn noticed(range: Option<(Duration, Duration)>) -> String {
    match range {
        Some((first, last)) => format!("between {first:.1?} and {last:.1?}"),
        None => "never (no client lost its connection)".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Docker; run with --ignored (see docs/operations.md)"]
async fn killed_node_loses_nothing() {
    const TEST: &str = "killed_node_loses_nothing";
    let victim = 1;
    let fleet = DockerFleet::start("killed").await;
    let traffic = Traffic::start(&fleet).await;
    tokio::time::sleep(WARM_UP).await;

    fleet.kill(victim).await;
    let outage_start = Instant::now();
    tokio::time::sleep(FAULT).await;
    fleet.start_node(victim).await;
    let outage_end = Instant::now();
    let ready = fleet.wait_ready(READY_LIMIT).await;
    fleet.log(&format!(
        "{} back, all links up after {ready:.1?}",
        NODES[victim]
    ));
    let back = Instant::now();
    tokio::time::sleep(AFTER).await;

    let summary = traffic.finish(&fleet, DRAIN_LIMIT).await;
    let unavailable = summary.count_between(outage_start, outage_end, |e| {
        e.recipient_home == victim && e.outcome == Outcome::Unavailable
    });
    let acked_elsewhere = summary.count_between(outage_start, outage_end, |e| {
        e.recipient_home != victim && e.outcome == Outcome::Acked
    });
    let acked_to_victim_after = summary.count_since(back, |e| {
        e.recipient_home == victim && e.outcome == Outcome::Acked
    });
    report(&format!(
        "{TEST}: during the {:.1?} outage of {}: {unavailable} copies to its recipients \
         failed with ShardUnavailable, {acked_elsewhere} copies to the other nodes' \
         recipients were acked; back (all links up) {ready:.1?} after docker start, \
         then {acked_to_victim_after} copies to its recipients acked; its clients noticed \
         their connections were gone {} after the kill",
        outage_end - outage_start,
        NODES[victim],
        noticed(summary.lost_connection_noticed(victim, outage_start)),
    ));
    summary.report_and_check(TEST);
    assert!(
        unavailable > 0,
        "no send to the killed node's recipients failed as ShardUnavailable"
    );
    assert!(
        acked_elsewhere > 0,
        "sends to the other nodes stopped while one was down"
    );
    assert!(
        acked_to_victim_after > 0,
        "sends to the restarted node's recipients do not succeed"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Docker; run with --ignored (see docs/operations.md)"]
async fn partitioned_node_heals() {
    const TEST: &str = "partitioned_node_heals";
    /// Links are up and forwarding within this long of the network healing.
    const HEAL_LIMIT: Duration = Duration::from_secs(10);
    let victim = 2;
    let fleet = DockerFleet::start("partition").await;
    let traffic = Traffic::start(&fleet).await;
    tokio::time::sleep(WARM_UP).await;

    let network = fleet.disconnect(victim).await;
    let cut = Instant::now();
    tokio::time::sleep(FAULT).await;
    // Timed from before the command: the network may be back before it returns.
    let healed = Instant::now();
    fleet.reconnect(victim, &network).await;

    // Poll until the other nodes show their link to the victim up and a
    // send forwarded to one of its recipients has been acked since the heal.
    let mut links_up = None;
    let mut forwarded = None;
    while (links_up.is_none() || forwarded.is_none()) && healed.elapsed() < 3 * HEAL_LIMIT {
        if links_up.is_none() && fleet.others_link_up_to(victim).await {
            links_up = Some(healed.elapsed());
        }
        if forwarded.is_none() {
            forwarded = traffic
                .first_forwarded_since(healed, victim, Outcome::Acked)
                .map(|at| at - healed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let heal_time = links_up.zip(forwarded).map(|(a, b)| a.max(b));
    fleet.log(&format!(
        "healed: links up after {links_up:.1?}, first forwarded ack after {forwarded:.1?}"
    ));
    let ready = fleet.wait_ready(READY_LIMIT).await;
    fleet.log(&format!("all links up {ready:.1?} after that"));
    tokio::time::sleep(AFTER).await;

    let summary = traffic.finish(&fleet, DRAIN_LIMIT).await;
    let unavailable = summary.count_between(cut, healed, |e| {
        e.recipient_home == victim && e.outcome == Outcome::Unavailable
    });
    let acked_elsewhere = summary.count_between(cut, healed, |e| {
        e.recipient_home != victim && e.outcome == Outcome::Acked
    });
    report(&format!(
        "{TEST}: during the {:.1?} partition of {}: {unavailable} copies to its recipients \
         failed with ShardUnavailable, {acked_elsewhere} copies to the other nodes' recipients \
         were acked; after the heal: links up in {links_up:.1?}, first forwarded send to it \
         acked in {forwarded:.1?}; its clients noticed their connections were gone {} after \
         the cut",
        healed - cut,
        NODES[victim],
        noticed(summary.lost_connection_noticed(victim, cut)),
    ));
    summary.report_and_check(TEST);
    let heal_time = heal_time.expect("the fleet did not heal within 30 s");
    assert!(
        heal_time < HEAL_LIMIT,
        "healing took {heal_time:.1?}, more than {HEAL_LIMIT:?}"
    );
    assert!(
        unavailable > 0,
        "no send to the cut-off node's recipients failed as ShardUnavailable"
    );
    assert!(
        acked_elsewhere > 0,
        "sends to the other nodes stopped during the partition"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Docker; run with --ignored (see docs/operations.md)"]
async fn rolling_restart_loses_nothing() {
    const TEST: &str = "rolling_restart_loses_nothing";
    /// Traffic between two restarts.
    const BETWEEN: Duration = Duration::from_secs(3);
    let fleet = DockerFleet::start("rolling").await;
    let traffic = Traffic::start(&fleet).await;
    tokio::time::sleep(WARM_UP).await;

    let mut restarts = Vec::new();
    let mut restart_times = Vec::new();
    for (victim, name) in NODES.iter().enumerate() {
        restart_times.push(Instant::now());
        let took = fleet.restart(victim).await;
        let ready = fleet.wait_ready(READY_LIMIT).await;
        fleet.log(&format!(
            "{name} restarted in {took:.1?}, all links up {ready:.1?} later"
        ));
        restarts.push(format!("{name} restart {took:.1?} + links up {ready:.1?}"));
        tokio::time::sleep(BETWEEN).await;
    }
    let all_restarted = Instant::now();
    tokio::time::sleep(AFTER).await;

    let summary = traffic.finish(&fleet, DRAIN_LIMIT).await;
    let acked_after: Vec<usize> = (0..NODES.len())
        .map(|node| {
            summary.count_since(all_restarted, |e| {
                e.recipient_home == node && e.outcome == Outcome::Acked
            })
        })
        .collect();
    let noticed_restart: Vec<String> = restart_times
        .iter()
        .enumerate()
        .map(|(node, &at)| {
            format!(
                "{} {}",
                NODES[node],
                noticed(summary.lost_connection_noticed(node, at))
            )
        })
        .collect();
    report(&format!(
        "{TEST}: {}; clients noticed the restart of their home node: {}; afterwards acked \
         copies per node's recipients {acked_after:?}",
        restarts.join(", "),
        noticed_restart.join(", ")
    ));
    summary.report_and_check(TEST);
    assert!(
        acked_after.iter().all(|&acked| acked > 0),
        "after the rolling restart some node's recipients get nothing acked: {acked_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Docker; run with --ignored (see docs/operations.md)"]
async fn growing_the_fleet_loses_nothing() {
    const TEST: &str = "growing_the_fleet_loses_nothing";
    /// Traffic between two steps of the procedure.
    const BETWEEN: Duration = Duration::from_secs(2);
    /// Longest wait for the handover once every node runs the new map.
    const HANDOFF_LIMIT: Duration = Duration::from_secs(60);
    let mut fleet = DockerFleet::start("grow").await;
    let traffic = Traffic::start(&fleet).await;
    tokio::time::sleep(WARM_UP).await;

    // The procedure of docs/operations.md, "Growing a fleet", as
    // docker/compose.grow.yaml scripts it: node-d starts on the epoch-2 map,
    // then the old nodes are restarted onto it one at a time.
    let began = Instant::now();
    fleet.grow().await;
    fleet.wait_healthy(3, READY_LIMIT).await;
    tokio::time::sleep(BETWEEN).await;
    let mut steps = Vec::new();
    for (index, name) in NODES.iter().enumerate() {
        let took = fleet.recreate(index).await;
        let healthy = fleet.wait_healthy(index, READY_LIMIT).await;
        steps.push(format!(
            "{name} recreated in {took:.1?}, healthy {healthy:.1?} later"
        ));
        tokio::time::sleep(BETWEEN).await;
    }
    let all_moved = Instant::now();
    let ready = fleet.wait_ready(READY_LIMIT).await;
    let handoff = fleet.wait_handoff(HANDOFF_LIMIT).await;
    let done = Instant::now();
    fleet.log(&format!(
        "all four nodes linked {ready:.1?} and the handover done {handoff:.1?} after the last restart"
    ));
    tokio::time::sleep(AFTER).await;

    let summary = traffic.finish(&fleet, DRAIN_LIMIT).await;
    // Recipients homed on node-c before the move: one of them now lives on node-d.
    let acked_to_c_after = summary.count_since(done, |e| {
        e.recipient_home == 2 && e.outcome == Outcome::Acked
    });
    let unavailable_during =
        summary.count_between(began, done, |e| e.outcome == Outcome::Unavailable);
    report(&format!(
        "{TEST}: {}; handover done {:.1?} after the last restart ({:.1?} after node-d started); \
         {unavailable_during} copies failed with ShardUnavailable during the procedure, \
         {acked_to_c_after} copies to node-c's former recipients acked after it",
        steps.join(", "),
        done - all_moved,
        done - began,
    ));
    summary.report_and_check(TEST);
    assert!(
        acked_to_c_after > 0,
        "sends to the moved and kept recipients do not succeed after the handover"
    );
}
