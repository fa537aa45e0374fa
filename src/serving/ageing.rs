//! Connection ageing: every gRPC connection is closed gracefully (HTTP/2
//! GOAWAY, the calls in flight finish within
//! `server.max_connection_age_grace_secs`, then the connection closes) once
//! it is about `server.max_connection_age_secs` old.
//!
//! Why: a gRPC client keeps one connection for hours, so after a scale-out
//! the clients stay on the old replicas and the new ones get nothing. A
//! client whose connection is closed with a GOAWAY reconnects (through its
//! balancer, DNS or the Service) and its new connection can land on a new
//! replica; the GOAWAY means no call fails (calls not yet started go to the
//! new connection, calls in flight finish). This is grpc-go's
//! `MaxConnectionAge` + `MaxConnectionAgeGrace`.
//!
//! Each connection's age is drawn uniformly from ±10 % around the setting,
//! so connections opened together (a client fleet restarted, a replica
//! that just came up) do not all reconnect at the same moment.
//!
//! It does not choose where the client reconnects: that is the client's
//! balancing (docs/operations.md#connection-ageing).

use std::{
    hash::{BuildHasher, RandomState},
    sync::Arc,
    time::Duration,
};

use tokio_util::task::AbortOnDropHandle;

use crate::serving::connection::{CloseReason, ConnectionHandle};

/// The share of the age drawn at random either way.
pub const JITTER: f64 = 0.10;

/// `max_age` scaled by a factor in `[1 - JITTER, 1 + JITTER)`, chosen by
/// `unit` in `[0, 1)`.
pub fn jittered(max_age: Duration, unit: f64) -> Duration {
    max_age.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0))
}

/// A uniform draw from `[0, 1)`, from the standard library's per-process
/// random keys (no dependency needed for a jitter).
fn random_unit() -> f64 {
    let bits = RandomState::new().hash_one(std::time::Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Starts the age timer of `handle` on the current runtime: at its
/// jittered age, [`ConnectionHandle::close_gracefully`] with
/// [`CloseReason::MaxAge`] and `grace`. Keep the returned guard for the
/// connection's life: dropping it stops the timer. `None` when ageing is
/// off.
pub fn watch(handle: &Arc<ConnectionHandle>, max_age: Option<Duration>, grace: Duration) -> Option<AbortOnDropHandle<()>> {
    let age = jittered(max_age?, random_unit());
    let handle = Arc::downgrade(handle);
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        tokio::time::sleep(age).await;
        if let Some(handle) = handle.upgrade() {
            handle.close_gracefully(CloseReason::MaxAge, grace);
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jitter_stays_within_ten_percent_either_way() {
        let age = Duration::from_secs(300);
        assert_eq!(jittered(age, 0.0), Duration::from_secs(270));
        assert_eq!(jittered(age, 0.5), Duration::from_secs(300));
        assert!(jittered(age, 0.999_999) < Duration::from_secs(330));
        assert_eq!(jittered(age, 7.0), Duration::from_secs(330), "out-of-range draws are clamped");
    }

    #[test]
    fn draws_are_spread_over_the_whole_range() {
        let draws: Vec<f64> = (0..2000).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        // Each tenth of the range gets some of 2000 draws (a fixed age, or
        // draws stuck in one half, would not).
        for decile in 0..10 {
            let n = draws.iter().filter(|u| (**u * 10.0) as usize == decile).count();
            assert!(n > 100, "decile {decile} got {n} of 2000");
        }
    }
}
