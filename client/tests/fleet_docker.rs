//! Fault tests on a real three-node fleet in Docker (`docker/compose.yaml`).
//!
//! For now, the checker that will judge them: `check` (the ledger and the
//! verdict, with unit tests that run without Docker).

#[path = "fleet_docker/check.rs"]
#[allow(dead_code)]
mod check;
