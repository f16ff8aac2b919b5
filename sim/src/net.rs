//! The flow-level network: links with capacities, flows across up to four
//! links (sender's uplink, its rack's uplink, the receiver's rack downlink,
//! the receiver's downlink), and how the links' capacity is shared.
//!
//! A flow's progress is `done` bytes at time `at` plus `rate` since; rates
//! change only when a flow starts or stops, and [`FlowNet::start`] and
//! [`FlowNet::stop`] return the flows whose rate may have changed, so the
//! simulator reschedules just those. Time is in microseconds, rates in bytes
//! per microsecond.

use crate::scenario::Sharing;

/// A link's index.
pub type LinkId = u32;
/// A flow's index (reused after the flow stops).
pub type FlowId = u32;

#[derive(Debug)]
struct Link {
    /// Bytes per microsecond.
    cap: f64,
    flows: Vec<FlowId>,
    /// Flows on it when its flows were last re-rated together.
    rated: usize,
    /// What a flow not limited elsewhere got when it was last filled
    /// ([`Sharing::WaterFill`]; its capacity when every flow was limited
    /// elsewhere).
    level: f64,
}

/// A link with more flows than this re-rates them all only once their
/// number moved by more than [`DRIFT`] since the last time; meanwhile a
/// new flow gets the current share. (The origin's uplink carries every
/// member's origin runs: re-rating ten thousand flows whenever one starts
/// made a thousand-member run quadratic.) Rates stay within 2 % of the
/// equal share.
const BIG_LINK: usize = 64;
/// See [`BIG_LINK`].
const DRIFT: f64 = 0.02;
/// A link's water level that moved by more than this fraction refills the
/// links its flows share ([`Sharing::WaterFill`]).
const LEVEL_MOVE: f64 = 0.01;

/// A flow and what the simulator keeps with it.
#[derive(Debug)]
pub struct Flow<T> {
    links: [LinkId; 4],
    nlinks: u8,
    /// What each of its links gave it when that link was last filled
    /// ([`Sharing::WaterFill`]): its rate is the least of them.
    alloc: [f64; 4],
    /// Bytes per microsecond.
    pub rate: f64,
    /// Bytes sent up to `at`.
    pub done: f64,
    /// When `done` was last brought up to date.
    pub at: u64,
    /// Tells this flow from earlier ones in its slot (and moves on when its
    /// rate changes): an event naming another version is stale.
    pub version: u32,
    /// The simulator's own data.
    pub data: T,
}

impl<T> Flow<T> {
    /// The flow's links.
    pub fn links(&self) -> &[LinkId] {
        &self.links[..self.nlinks as usize]
    }

    /// When `done` reaches `target` at the current rate (`None`: never).
    pub fn reaches(&self, target: f64) -> Option<u64> {
        if self.done >= target {
            return Some(self.at);
        }
        (self.rate > 0.0).then(|| self.at + ((target - self.done) / self.rate).ceil() as u64)
    }
}

/// Links and the flows across them.
#[derive(Debug)]
pub struct FlowNet<T> {
    sharing: Sharing,
    links: Vec<Link>,
    flows: Vec<Option<Flow<T>>>,
    /// The last version each slot's flows reached: a flow that reuses a slot
    /// goes on from there, so a (flow id, version) pair is never repeated.
    versions: Vec<u32>,
    free: Vec<FlowId>,
    live: usize,
}

impl<T> FlowNet<T> {
    /// An empty network.
    pub fn new(sharing: Sharing) -> Self {
        FlowNet {
            sharing,
            links: Vec::new(),
            flows: Vec::new(),
            versions: Vec::new(),
            free: Vec::new(),
            live: 0,
        }
    }

    /// A link carrying `bytes_per_s` (`f64::INFINITY`: unlimited).
    pub fn add_link(&mut self, bytes_per_s: f64) -> LinkId {
        self.links.push(Link {
            cap: bytes_per_s / 1e6,
            flows: Vec::new(),
            rated: 0,
            level: bytes_per_s / 1e6,
        });
        (self.links.len() - 1) as LinkId
    }

    /// Flows in the network.
    pub fn live(&self) -> usize {
        self.live
    }

    /// A flow.
    pub fn get(&self, id: FlowId) -> Option<&Flow<T>> {
        self.flows.get(id as usize).and_then(Option::as_ref)
    }

    /// A flow, to change its data.
    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow<T>> {
        self.flows.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// Brings a flow's `done` up to `now`.
    pub fn advance(&mut self, id: FlowId, now: u64) {
        if let Some(f) = self.get_mut(id) {
            if now > f.at {
                f.done += f.rate * (now - f.at) as f64;
                f.at = now;
            }
        }
    }

    /// Starts a flow across `links` (none: a flow that never moves, as from
    /// a hung sender). Returns it and every flow whose rate may have changed
    /// (the new one included); their `done` is up to date.
    pub fn start(&mut self, now: u64, links: &[LinkId], data: T) -> (FlowId, Vec<FlowId>) {
        assert!(links.len() <= 4, "a flow crosses at most four links");
        let mut l = [0; 4];
        l[..links.len()].copy_from_slice(links);
        let mut flow = Flow {
            links: l,
            nlinks: links.len() as u8,
            alloc: [f64::INFINITY; 4],
            rate: 0.0,
            done: 0.0,
            at: now,
            version: 0,
            data,
        };
        let id = match self.free.pop() {
            Some(id) => {
                flow.version = self.versions[id as usize].wrapping_add(1);
                self.flows[id as usize] = Some(flow);
                id
            }
            None => {
                self.flows.push(Some(flow));
                self.versions.push(0);
                (self.flows.len() - 1) as FlowId
            }
        };
        self.live += 1;
        for &link in links {
            self.links[link as usize].flows.push(id);
        }
        let changed = self.rerate(now, links, Some(id));
        (id, changed)
    }

    /// Stops a flow (its `done` brought up to `now`). Returns it and the
    /// flows whose rate may have changed.
    pub fn stop(&mut self, now: u64, id: FlowId) -> Option<(Flow<T>, Vec<FlowId>)> {
        self.advance(id, now);
        let flow = self.flows.get_mut(id as usize)?.take()?;
        self.versions[id as usize] = flow.version;
        self.free.push(id);
        self.live -= 1;
        self.unlink(id, flow.links());
        let changed = self.rerate(now, flow.links(), None);
        Some((flow, changed))
    }

    /// Takes flow `id` out of the flow lists of `links`.
    fn unlink(&mut self, id: FlowId, links: &[LinkId]) {
        for &link in links {
            let flows = &mut self.links[link as usize].flows;
            let pos = flows
                .iter()
                .position(|&f| f == id)
                .expect("flow on its link");
            flows.swap_remove(pos);
        }
    }

    /// The live flows' ids, in ascending order.
    pub fn ids(&self) -> impl Iterator<Item = FlowId> + '_ {
        self.flows
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_some())
            .map(|(i, _)| i as FlowId)
    }

    /// Takes a flow off its links: it stays, but never moves again (its
    /// sender hung). Returns the flows whose rate may have changed.
    pub fn detach(&mut self, now: u64, id: FlowId) -> Vec<FlowId> {
        self.advance(id, now);
        let Some(f) = self.get_mut(id) else {
            return Vec::new();
        };
        let links: Vec<LinkId> = f.links().to_vec();
        f.nlinks = 0;
        f.rate = 0.0;
        f.version = f.version.wrapping_add(1);
        self.unlink(id, &links);
        self.rerate(now, &links, None)
    }

    /// Recomputes rates after the flow counts of `links` changed.
    fn rerate(&mut self, now: u64, links: &[LinkId], new_flow: Option<FlowId>) -> Vec<FlowId> {
        match self.sharing {
            Sharing::FairShare | Sharing::Auto => {
                let mut touched: Vec<FlowId> = Vec::new();
                for &l in links {
                    if self.due(l) {
                        touched.extend(self.links[l as usize].flows.iter().copied());
                    }
                }
                // A new flow is rated whatever its links did.
                if let Some(&newest) = new_flow.as_ref() {
                    touched.push(newest);
                }
                self.rate(now, touched, Self::fair_share)
            }
            Sharing::WaterFill => {
                let mut touched: Vec<FlowId> = Vec::new();
                let mut moved: Vec<LinkId> = Vec::new();
                for &l in links {
                    if self.due(l) {
                        let before = self.links[l as usize].level;
                        self.fill(l, &mut touched);
                        let after = self.links[l as usize].level;
                        if (after - before).abs() > LEVEL_MOVE * before.max(after) {
                            moved.push(l);
                        }
                    }
                }
                // Where a link's level moved, the other links of its flows
                // are filled again, once: what it now gives or leaves
                // reaches the links it shares flows with.
                let mut next: Vec<LinkId> = Vec::new();
                for &l in &moved {
                    for &id in &self.links[l as usize].flows {
                        let f = self.get(id).expect("live flow");
                        for &k in f.links() {
                            if !links.contains(&k) && self.links[k as usize].flows.len() <= BIG_LINK
                            {
                                next.push(k);
                            }
                        }
                    }
                }
                next.sort_unstable();
                next.dedup();
                for k in next {
                    self.fill(k, &mut touched);
                }
                if let Some(newest) = new_flow {
                    // A big link not filled again gives a newcomer its level,
                    // at most an equal share.
                    let f = self.flows[newest as usize].as_mut().expect("live flow");
                    for (i, &l) in f.links[..f.nlinks as usize].iter().enumerate() {
                        if f.alloc[i].is_infinite() {
                            let link = &self.links[l as usize];
                            f.alloc[i] = link.level.min(link.cap / link.flows.len() as f64);
                        }
                    }
                    touched.push(newest);
                }
                self.rate(now, touched, |net, id| {
                    let f = net.get(id).expect("live flow");
                    f.alloc[..f.nlinks as usize]
                        .iter()
                        .copied()
                        .fold(f64::INFINITY, f64::min)
                })
            }
            Sharing::MaxMin => self.max_min(now),
        }
    }

    /// Gives each flow in `touched` (once) the rate `rate_of` says; returns
    /// those whose rate changed (only they need a new schedule).
    fn rate(
        &mut self,
        now: u64,
        mut touched: Vec<FlowId>,
        rate_of: impl Fn(&Self, FlowId) -> f64,
    ) -> Vec<FlowId> {
        touched.sort_unstable();
        touched.dedup();
        touched.retain(|&id| {
            let rate = rate_of(self, id);
            let before = self.get(id).expect("live flow").rate;
            self.set_rate(id, now, rate);
            self.get(id).expect("live flow").rate != before
        });
        touched
    }

    /// Whether link `l`'s flows are re-rated now that its flow count
    /// changed: always on a small link, on a big one only once the count
    /// drifted ([`BIG_LINK`]); marks it re-rated.
    fn due(&mut self, l: LinkId) -> bool {
        let link = &mut self.links[l as usize];
        let n = link.flows.len();
        let drift = (n as f64 - link.rated as f64).abs();
        let due = n <= BIG_LINK || drift > DRIFT * link.rated as f64;
        if due {
            link.rated = n;
        }
        due
    }

    /// Water-fills link `l`: each flow on it can use at most the level of
    /// its tightest other link; the capacity those flows leave is shared
    /// equally by the rest. A flow's rate is the least any of its links
    /// gave it, so no link carries more than its capacity (as with the
    /// equal share), but the share a flow limited elsewhere cannot use goes
    /// to the others, as with max-min. The other links are not filled again
    /// in turn: what they gave stays until their own flows change.
    /// Flows whose allocation changed are added to `changed`.
    fn fill(&mut self, l: LinkId, changed: &mut Vec<FlowId>) {
        let link = &self.links[l as usize];
        let mut wants: Vec<(f64, FlowId, usize)> = link
            .flows
            .iter()
            .map(|&id| {
                let f = self.flows[id as usize].as_ref().expect("live flow");
                let mut elsewhere = f64::INFINITY;
                let mut slot = 0;
                for (i, &k) in f.links[..f.nlinks as usize].iter().enumerate() {
                    if k == l {
                        slot = i;
                    } else {
                        elsewhere = elsewhere.min(self.links[k as usize].level);
                    }
                }
                (elsewhere, id, slot)
            })
            .collect();
        let (mut left, mut open) = (link.cap, wants.len());
        let mut level = f64::INFINITY;
        let equal = link.cap / wants.len().max(1) as f64;
        if wants.iter().all(|w| w.0 >= equal) {
            // Nobody is held below the equal share elsewhere: no sort.
            level = equal;
        } else {
            wants.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            for &(want, ..) in &wants {
                if want * open as f64 <= left {
                    left -= want;
                    open -= 1;
                } else {
                    level = left / open as f64;
                    break;
                }
            }
        }
        // Every flow limited elsewhere: what they leave is split among them
        // as room to grow, so a link with capacity to spare never holds a
        // flow to what its other links gave it when this one was filled.
        let room = if level.is_finite() {
            0.0
        } else {
            left / wants.len().max(1) as f64
        };
        for &(want, id, slot) in &wants {
            let f = self.flows[id as usize].as_mut().expect("live flow");
            let give = want.min(level) + room;
            if f.alloc[slot] != give {
                f.alloc[slot] = give;
                changed.push(id);
            }
        }
        let link = &mut self.links[l as usize];
        link.level = if level.is_finite() { level } else { link.cap };
    }

    fn fair_share(&self, id: FlowId) -> f64 {
        let f = self.get(id).expect("live flow");
        f.links()
            .iter()
            .map(|&l| {
                let link = &self.links[l as usize];
                link.cap / link.flows.len() as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    fn set_rate(&mut self, id: FlowId, now: u64, rate: f64) {
        self.advance(id, now);
        let f = self.get_mut(id).expect("live flow");
        let rate = if rate.is_finite() { rate } else { 0.0 };
        if f.rate != rate {
            f.rate = rate;
            f.version = f.version.wrapping_add(1);
        }
    }

    /// Exact max-min rates by progressive filling; returns every flow whose
    /// rate changed.
    fn max_min(&mut self, now: u64) -> Vec<FlowId> {
        let mut left: Vec<f64> = self.links.iter().map(|l| l.cap).collect();
        let mut open: Vec<usize> = self.links.iter().map(|l| l.flows.len()).collect();
        let mut fixed = vec![false; self.flows.len()];
        let mut rates = vec![0.0f64; self.flows.len()];
        loop {
            // The link whose equal share of what is left is smallest.
            let bottleneck = (0..self.links.len())
                .filter(|&l| open[l] > 0)
                .map(|l| (left[l] / open[l] as f64, l))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let Some((share, l)) = bottleneck else { break };
            let flows: Vec<FlowId> = self.links[l]
                .flows
                .iter()
                .copied()
                .filter(|&f| !fixed[f as usize])
                .collect();
            for f in flows {
                fixed[f as usize] = true;
                rates[f as usize] = share;
                for &k in self.get(f).expect("live flow").links() {
                    left[k as usize] = (left[k as usize] - share).max(0.0);
                    open[k as usize] -= 1;
                }
            }
        }
        let mut changed = Vec::new();
        for id in 0..self.flows.len() as FlowId {
            if let Some(f) = self.get(id) {
                // Flows across no link never move.
                let rate = if f.nlinks == 0 {
                    0.0
                } else {
                    rates[id as usize]
                };
                if f.rate != rate {
                    self.set_rate(id, now, rate);
                    changed.push(id);
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    #[test]
    fn fair_share_splits_a_link_and_frees_it_again() {
        let mut n = FlowNet::new(Sharing::FairShare);
        let up = n.add_link(10.0 * MB);
        let (d1, d2) = (n.add_link(100.0 * MB), n.add_link(100.0 * MB));
        let (a, _) = n.start(0, &[up, d1], ());
        assert_eq!(n.get(a).unwrap().rate, 10.0);
        let (b, changed) = n.start(1_000_000, &[up, d2], ());
        assert_eq!(changed, vec![a, b]);
        assert_eq!(n.get(a).unwrap().rate, 5.0);
        assert_eq!(n.get(a).unwrap().done, 10.0 * MB);
        let (_, changed) = n.stop(2_000_000, b).unwrap();
        assert_eq!(changed, vec![a]);
        assert_eq!(n.get(a).unwrap().done, 15.0 * MB);
        assert_eq!(n.get(a).unwrap().reaches(25.0 * MB), Some(3_000_000));
        // A flow across no link never moves.
        let (c, _) = n.start(0, &[], ());
        assert_eq!(n.get(c).unwrap().reaches(1.0), None);
    }

    #[test]
    fn max_min_hands_unused_share_to_the_others() {
        // Two flows share a 10 MB/s uplink; one is limited to 2 MB/s by its
        // downlink, so max-min gives the other 8 — the fair share gives 5,
        // water-filling 8 too.
        for (sharing, other) in [
            (Sharing::MaxMin, 8.0),
            (Sharing::FairShare, 5.0),
            (Sharing::WaterFill, 8.0),
        ] {
            let mut n = FlowNet::new(sharing);
            let up = n.add_link(10.0 * MB);
            let slow = n.add_link(2.0 * MB);
            let fast = n.add_link(100.0 * MB);
            let (a, _) = n.start(0, &[up, slow], ());
            let (b, _) = n.start(0, &[up, fast], ());
            assert_eq!(n.get(a).unwrap().rate, 2.0);
            assert_eq!(n.get(b).unwrap().rate, other, "{sharing:?}");
        }
    }

    #[test]
    fn water_filling_hands_on_what_a_flow_leaves_and_takes_it_back() {
        let mut n = FlowNet::new(Sharing::WaterFill);
        let up = n.add_link(10.0 * MB);
        let slow = n.add_link(2.0 * MB);
        let (fast1, fast2) = (n.add_link(100.0 * MB), n.add_link(100.0 * MB));
        let (a, _) = n.start(0, &[up, slow], ());
        let (b, _) = n.start(0, &[up, fast1], ());
        assert_eq!((n.get(a).unwrap().rate, n.get(b).unwrap().rate), (2.0, 8.0));
        // A second flow on the slow downlink: `a` drops to 1, and the
        // uplink's level moves, so `b` and the newcomer on it share the 9
        // left (a flow on `fast2` only).
        let (c, _) = n.start(1, &[slow], ());
        assert_eq!(n.get(a).unwrap().rate, 1.0);
        assert_eq!(n.get(c).unwrap().rate, 1.0);
        assert_eq!(n.get(b).unwrap().rate, 9.0);
        let (d, _) = n.start(2, &[up, fast2], ());
        assert_eq!(n.get(b).unwrap().rate, 4.5);
        assert_eq!(n.get(d).unwrap().rate, 4.5);
        n.stop(3, c);
        // `a` may have 2 again on its downlink; the uplink gives it its
        // share once the uplink is filled again (its level moved).
        let sum: f64 = [a, b, d].iter().map(|&f| n.get(f).unwrap().rate).sum();
        assert!(sum <= 10.0 + 1e-9, "the uplink carries {sum}");
        assert_eq!(n.get(a).unwrap().rate, 2.0);
    }

    #[test]
    fn water_filling_never_fills_a_link_past_its_capacity() {
        let mut rng = crate::rng::Rng::new(7);
        let mut n = FlowNet::new(Sharing::WaterFill);
        let caps: Vec<f64> = (0..12).map(|i| f64::from(1 + i % 5) * MB).collect();
        let links: Vec<LinkId> = caps.iter().map(|&c| n.add_link(c)).collect();
        let mut live: Vec<FlowId> = Vec::new();
        // At most 60 flows, so no link has more than `BIG_LINK` (a big
        // link's newcomers get its level without a fill, within `DRIFT`).
        for step in 0..2_000u64 {
            if live.len() >= 60 || (live.len() > 3 && rng.below(3) == 0) {
                let f = live.swap_remove(rng.below(live.len() as u64) as usize);
                n.stop(step, f);
            } else {
                let a = links[rng.below(6) as usize];
                let b = links[6 + rng.below(6) as usize];
                live.push(n.start(step, &[a, b], ()).0);
            }
            for (l, &cap) in caps.iter().enumerate() {
                let carried: f64 = live
                    .iter()
                    .map(|&f| n.get(f).unwrap())
                    .filter(|f| f.links().contains(&(l as LinkId)))
                    .map(|f| f.rate)
                    .sum();
                assert!(
                    carried <= cap / 1e6 * (1.0 + 1e-9),
                    "step {step}: link {l} carries {carried}"
                );
            }
            assert!(live.iter().all(|&f| n.get(f).unwrap().rate > 0.0));
        }
    }
}
