//! Finding the node's uplink without being told: an upload cap learned
//! from losses that every peer connection sees at once.
//!
//! Uploads go to many peers over as many QUIC connections, each with its own
//! congestion controller. When the node's own uplink is what limits them
//! (a cloud instance's bandwidth cap, a shaped or narrow link), they all
//! overfill its queue together: packets are lost on most connections in the
//! same half second, streams go quiet while they are retransmitted,
//! downloaders cut them as stalled and ask elsewhere, and the bytes already
//! sent are wasted (a fifth of all peer traffic in the shaped lab at
//! 10 mbit, `docs/BENCHMARKS.md`). Pacing uploads just under the link, as
//! `--peer-upload-rate` does when an operator knows it, avoids that; this
//! learns such a cap:
//!
//! - every [`TICK`], from each connection's QUIC counters: packets sent and
//!   declared lost, bytes sent; a connection that sent at least
//!   [`ACTIVE_PACKETS`] is active, one that also lost [`LOSSY`] of them is
//!   lossy;
//! - when at least [`MIN_ACTIVE`] connections are active and half of them
//!   are lossy, the uplink is the bottleneck (loss on one path or at one
//!   receiver shows on one connection, not on most) — if it carried near
//!   the most it carried lately ([`NEAR_PEAK`] of the best tick in
//!   [`PEAK_WINDOW`]): the cap becomes [`BACK_OFF`] of what got through in
//!   the tick, and holds for [`HOLD`];
//! - after that, each clean tick raises it by [`PROBE`], so a link that
//!   grew is found again; [`FORGET`] without such a tick drops it.
//!
//! [`Governor`] is the pure policy (samples in, cap out); [`run`] feeds it
//! from the server's live connections and applies the cap to the upload
//! [`RateLimit`], under the operator's cap if there is one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::rate::RateLimit;

/// How often the connections are sampled.
pub const TICK: Duration = Duration::from_millis(500);
/// Packets a connection must have sent in a tick to count.
pub const ACTIVE_PACKETS: u64 = 16;
/// The share of its packets a lossy connection lost in a tick.
pub const LOSSY: f64 = 0.02;
/// Active connections needed before losses say anything about the uplink.
pub const MIN_ACTIVE: usize = 3;
/// The cap after a congested tick, as a share of what got through.
pub const BACK_OFF: f64 = 0.9;
/// How long a new cap holds before probing upwards.
pub const HOLD: Duration = Duration::from_secs(1);
/// The rise per clean tick after the hold.
pub const PROBE: f64 = 0.02;
/// A cap not confirmed by congestion for this long is dropped.
pub const FORGET: Duration = Duration::from_secs(60);
/// The lowest cap learned (bytes a second).
pub const FLOOR: u64 = 128 << 10;
/// A congested tick sets the cap only if this share of the best tick of
/// the last [`PEAK_WINDOW`] got through: a full uplink carries about the
/// same every tick. In the shaped lab (32 members at 10 mbit) ticks with
/// three or four active connections, half of them lossy, came while the
/// uplink carried 3–4 mbit of the 8–9 it had carried a second before —
/// losses at the receivers' downlinks, not this uplink — and set caps of
/// 1.6–3.5 mbit that the probe took 20–30 s to climb back from; two
/// members' uploads averaged 4 mbit for the whole pull.
pub const NEAR_PEAK: f64 = 0.75;
/// How far back the best tick is looked for (so a link that shrank for good
/// is learned once it has carried less for this long).
pub const PEAK_WINDOW: Duration = Duration::from_secs(4);

/// What the connections did in one tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Bytes sent (UDP payload, retransmissions included).
    pub bytes: u64,
    /// Bytes of those declared lost.
    pub lost_bytes: u64,
    /// Connections that sent at least [`ACTIVE_PACKETS`].
    pub active: usize,
    /// Of those, the ones that lost at least [`LOSSY`] of their packets.
    pub lossy: usize,
}

/// One connection's QUIC counters at a tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Bytes declared lost.
    pub lost_bytes: u64,
}

/// Turns successive counters of each connection into [`Sample`]s.
#[derive(Debug, Default)]
pub struct Sampler {
    last: HashMap<usize, Counters>,
}

impl Sampler {
    /// The tick's sample from every live connection's counters, by id.
    /// Connections seen for the first time count from zero.
    pub fn sample(&mut self, now: impl IntoIterator<Item = (usize, Counters)>) -> Sample {
        let mut s = Sample::default();
        let mut next = HashMap::with_capacity(self.last.len());
        for (id, c) in now {
            let before = self.last.get(&id).copied().unwrap_or_default();
            let sent = c.sent_packets.saturating_sub(before.sent_packets);
            let lost = c.lost_packets.saturating_sub(before.lost_packets);
            s.bytes += c.sent_bytes.saturating_sub(before.sent_bytes);
            s.lost_bytes += c.lost_bytes.saturating_sub(before.lost_bytes);
            if sent >= ACTIVE_PACKETS {
                s.active += 1;
                if lost as f64 >= LOSSY * sent as f64 {
                    s.lossy += 1;
                }
            }
            next.insert(id, c);
        }
        self.last = next;
        s
    }
}

/// The learned cap. Pure: the caller says how long each tick was.
#[derive(Debug, Default)]
pub struct Governor {
    cap: Option<f64>,
    /// Time since the cap was last set by congestion.
    since_congestion: Duration,
    /// What got through (bytes a second) in the ticks of the last
    /// [`PEAK_WINDOW`], with their lengths; oldest first.
    recent: std::collections::VecDeque<(Duration, f64)>,
}

impl Governor {
    /// Takes a tick's sample (`tick` long) and returns the cap to apply
    /// (bytes a second), or `None` for none.
    pub fn tick(&mut self, s: &Sample, tick: Duration) -> Option<u64> {
        let secs = tick.as_secs_f64().max(1e-3);
        let through = s.bytes.saturating_sub(s.lost_bytes) as f64 / secs;
        self.recent.push_back((tick, through));
        let mut span: Duration = self.recent.iter().map(|(d, _)| *d).sum();
        while span > PEAK_WINDOW && self.recent.len() > 1 {
            let (d, _) = self.recent.pop_front().expect("more than one");
            span -= d;
        }
        let peak = self.recent.iter().map(|&(_, b)| b).fold(0.0, f64::max);
        let congested =
            s.active >= MIN_ACTIVE && 2 * s.lossy >= s.active && through >= NEAR_PEAK * peak;
        if congested {
            let target = (BACK_OFF * through).max(FLOOR as f64);
            self.cap = Some(self.cap.map_or(target, |c| c.min(target)));
            self.since_congestion = Duration::ZERO;
        } else if let Some(cap) = self.cap {
            self.since_congestion += tick;
            if self.since_congestion >= FORGET {
                self.cap = None;
            } else if self.since_congestion >= HOLD {
                self.cap = Some(cap * (1.0 + PROBE));
            }
        }
        self.cap.map(|c| c as u64)
    }
}

/// The connections whose uploads are governed, by `quinn`'s stable id.
pub type Connections = Arc<Mutex<HashMap<usize, quinn::Connection>>>;

/// Samples `conns` every [`TICK`] and applies the learned cap to `rate`
/// until the task is dropped.
pub async fn run(conns: Connections, rate: RateLimit) {
    let mut sampler = Sampler::default();
    let mut governor = Governor::default();
    let mut applied = None;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        ticks.tick().await;
        let now = tokio::time::Instant::now();
        let counters: Vec<(usize, Counters)> = conns
            .lock()
            .expect("connections lock")
            .iter()
            .map(|(&id, c)| {
                let st = c.stats();
                (
                    id,
                    Counters {
                        sent_packets: st.path.sent_packets,
                        lost_packets: st.path.lost_packets,
                        sent_bytes: st.udp_tx.bytes,
                        lost_bytes: st.path.lost_bytes,
                    },
                )
            })
            .collect();
        let sample = sampler.sample(counters);
        let cap = governor.tick(&sample, now - last);
        last = now;
        if cap != applied {
            if cap.is_some() != applied.is_some() {
                tracing::info!(
                    cap_bytes_per_sec = ?cap,
                    active = sample.active,
                    lossy = sample.lossy,
                    "peer uploads {}",
                    if cap.is_some() {
                        "paced: most connections lose packets at once, the uplink is full"
                    } else {
                        "no longer paced"
                    }
                );
            }
            tracing::debug!(
                cap_bytes_per_sec = ?cap,
                sent_bytes = sample.bytes,
                lost_bytes = sample.lost_bytes,
                active = sample.active,
                lossy = sample.lossy,
                "learned upload cap"
            );
            rate.set_learned(cap);
            crate::metrics::global()
                .peer_upload_learned_cap
                .set(cap.map_or(0, |c| c as i64));
            applied = cap;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn congested(bytes: u64) -> Sample {
        Sample {
            bytes,
            lost_bytes: bytes / 20,
            active: 8,
            lossy: 6,
        }
    }

    fn clean(bytes: u64) -> Sample {
        Sample {
            bytes,
            lost_bytes: 0,
            active: 8,
            lossy: 0,
        }
    }

    #[test]
    fn losses_on_most_connections_cap_uploads_under_what_got_through() {
        let mut g = Governor::default();
        assert_eq!(g.tick(&clean(1_000_000), TICK), None);
        // 1 MB sent in half a second, 5 % lost: 1.9 MB/s got through.
        let cap = g.tick(&congested(1_000_000), TICK).unwrap();
        assert_eq!(cap, (0.9 * 1_900_000.0) as u64);
        // Another congested tick can only lower it.
        let lower = g.tick(&congested(800_000), TICK).unwrap();
        assert!(lower < cap, "{lower} {cap}");
        assert_eq!(g.tick(&congested(10_000_000), TICK), Some(lower));
    }

    #[test]
    fn loss_on_a_few_connections_or_few_connections_is_not_the_uplink() {
        let mut g = Governor::default();
        let one_path = Sample {
            lossy: 3,
            ..congested(1_000_000)
        };
        assert_eq!(g.tick(&one_path, TICK), None);
        let two_connections = Sample {
            active: 2,
            lossy: 2,
            ..congested(1_000_000)
        };
        assert_eq!(g.tick(&two_connections, TICK), None);
        // Half of them lossy is enough.
        let half = Sample {
            lossy: 4,
            ..congested(1_000_000)
        };
        assert!(g.tick(&half, TICK).is_some());
    }

    #[test]
    fn a_cap_holds_then_probes_upwards_and_is_forgotten() {
        let mut g = Governor::default();
        let cap = g.tick(&congested(1_000_000), TICK).unwrap();
        // Held for a second.
        assert_eq!(g.tick(&clean(0), TICK), Some(cap));
        let probed = g.tick(&clean(0), TICK).unwrap();
        assert_eq!(probed, (cap as f64 * (1.0 + PROBE)) as u64);
        // Congestion again takes it back down.
        let again = g.tick(&congested(1_000_000), TICK).unwrap();
        assert!(again <= cap + 1, "{again} {cap}");
        let ticks = (FORGET.as_millis() / TICK.as_millis()) as usize;
        let mut last = Some(again);
        for _ in 0..ticks {
            last = g.tick(&clean(0), TICK);
        }
        assert_eq!(last, None);
    }

    #[test]
    fn losses_while_the_uplink_carries_far_less_than_lately_are_not_the_uplink() {
        let mut g = Governor::default();
        assert_eq!(g.tick(&clean(1_000_000), TICK), None);
        // A second later a few connections lose packets while the uplink
        // carries a third of what it did: not this uplink's doing.
        assert_eq!(g.tick(&clean(900_000), TICK), None);
        assert_eq!(g.tick(&congested(300_000), TICK), None);
        // Near what it carried lately, the same losses are.
        let cap = g.tick(&congested(800_000), TICK).unwrap();
        assert_eq!(cap, (0.9 * 1_520_000.0) as u64);
        // Paced, a lossy tick at a fraction of the cap does not ratchet it down.
        assert_eq!(g.tick(&congested(200_000), TICK), Some(cap));
        // A link that shrank for good: once the window holds only the
        // smaller ticks, their losses set the cap.
        let ticks = (PEAK_WINDOW.as_millis() / TICK.as_millis()) as usize;
        let mut last = None;
        for _ in 0..=ticks {
            last = g.tick(&congested(300_000), TICK);
        }
        assert_eq!(last, Some((0.9 * 570_000.0) as u64));
    }

    #[test]
    fn the_cap_never_goes_under_the_floor() {
        let mut g = Governor::default();
        assert_eq!(g.tick(&congested(1_000), TICK), Some(FLOOR));
    }

    #[test]
    fn samples_are_differences_per_connection_and_new_ones_count_from_zero() {
        let mut s = Sampler::default();
        let c = |sent, lost| Counters {
            sent_packets: sent,
            lost_packets: lost,
            sent_bytes: sent * 1200,
            lost_bytes: lost * 1200,
        };
        let first = s.sample([(1, c(100, 0)), (2, c(10, 5))]);
        assert_eq!(
            first,
            Sample {
                bytes: 110 * 1200,
                lost_bytes: 5 * 1200,
                active: 1,
                lossy: 0
            }
        );
        // Connection 2 gone, 3 new; 1 sent 50 more and lost 2 (4 %).
        let second = s.sample([(1, c(150, 2)), (3, c(20, 0))]);
        assert_eq!(
            second,
            Sample {
                bytes: 70 * 1200,
                lost_bytes: 2 * 1200,
                active: 2,
                lossy: 1
            }
        );
    }
}
