//! Small swarms with asserted outcomes: every member completes with
//! verified data, the origin sends about one copy, corrupt chunks are never
//! stored, failures do not stall anyone, and a seed gives one result.

use shoal_sim::scenario::Outage;
use shoal_sim::{run, Report, Scenario, Sharing};

fn base(nodes: u32) -> Scenario {
    Scenario {
        nodes,
        layers: 2,
        layer_bytes: 4 << 20,
        rate: 100_000_000 / 8,
        ..Scenario::default()
    }
}

/// What every run must hold, whatever it models.
fn sound(r: &Report) {
    assert!(r.finished, "not everyone finished: {}", r.table());
    let c = &r.counters;
    assert_eq!(c.corrupt_stored, 0, "{}", r.table());
    assert_eq!(c.unverifiable_requests, 0, "{}", r.table());
    assert_eq!(
        c.past_deadlines,
        0,
        "a session asked to spin: {}",
        r.table()
    );
    // Every member that finished received at least the whole image.
    assert!(r.down_per_node.min >= 0.999, "{}", r.table());
}

#[test]
fn a_cold_swarm_costs_the_origin_one_copy_and_stays_near_the_bound() {
    for nodes in [10, 50] {
        let r = run(Scenario {
            layer_bytes: 16 << 20,
            ..base(nodes)
        })
        .unwrap();
        sound(&r);
        assert!(
            r.egress_ratio < 1.01,
            "origin sent {:.3} copies: {}",
            r.egress_ratio,
            r.table()
        );
        // Measured 1.37× (10) and 1.91× (50); 1.72× and 2.14× before
        // members watched their peers (docs/BENCHMARKS.md).
        let ratio = r.ratio_to_bound.unwrap();
        assert!(ratio < 2.5, "{ratio:.2}× the bound: {}", r.table());
        assert!(r.slowest_over_median.unwrap() < 1.3, "{}", r.table());
    }
}

#[test]
fn watching_peers_spreads_chunks_sooner_than_the_tracker_alone() {
    let sc = Scenario {
        layer_bytes: 16 << 20,
        ..base(50)
    };
    let watching = run(sc.clone()).unwrap();
    let alone = run(Scenario {
        watch_peers: Some(0),
        ..sc
    })
    .unwrap();
    sound(&watching);
    sound(&alone);
    assert_eq!(alone.counters.watch_frames, 0);
    assert!(watching.counters.watch_frames > 0);
    let (w, a) = (
        watching.ratio_to_bound.unwrap(),
        alone.ratio_to_bound.unwrap(),
    );
    eprintln!("watching {w:.3}× the bound, tracker alone {a:.3}×");
    assert!(
        w < a,
        "watching {w:.3}× against {a:.3}×: {}",
        watching.table()
    );
}

#[test]
fn two_hundred_members_finish() {
    let r = run(Scenario {
        layers: 1,
        ..base(200)
    })
    .unwrap();
    sound(&r);
    assert!(r.egress_ratio < 1.05, "{}", r.table());
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let sc = Scenario {
        churn: 0.1,
        malicious: 0.1,
        ..base(30)
    };
    let strip = |mut r: Report| {
        r.wall_s = 0.0;
        r.peak_rss_mib = None;
        r
    };
    let a = strip(run(sc.clone()).unwrap());
    let b = strip(run(sc.clone()).unwrap());
    assert_eq!(a, b);
    let c = strip(run(Scenario { seed: 2, ..sc }).unwrap());
    assert_ne!(a.per_node, c.per_node);
}

#[test]
fn corrupt_chunks_are_rejected_reported_and_their_senders_excluded() {
    let r = run(Scenario {
        malicious: 0.2,
        ..base(30)
    })
    .unwrap();
    sound(&r);
    assert!(r.counters.bad_chunks > 0, "{}", r.table());
    assert!(
        r.excluded > 0,
        "no corrupt member was excluded: {}",
        r.table()
    );
    // Honest members cost the origin one copy; excluded members are
    // served by the origin alone.
    let honest = r.egress_ratio - r.egress_ratio_malicious;
    assert!(honest < 1.05, "honest members: {honest:.3}: {}", r.table());
}

#[test]
fn members_dying_or_frozen_mid_pull_stall_nobody() {
    for (churn, frozen) in [(0.1, 0.0), (0.0, 0.1)] {
        for seed in 1..=4 {
            let r = run(Scenario {
                churn,
                churn_window_ms: 2_000,
                frozen,
                seed,
                ..base(40)
            })
            .unwrap();
            sound(&r);
            // Chunks only a dead member held, or leased, go to the origin
            // once more under a lease: no stampede of every waiting member
            // (seed 1: none such; seeds 3 and 4 of churn: 1.18 and 1.12).
            let egress_cap = if seed == 1 { 1.05 } else { 1.25 };
            assert!(r.egress_ratio < egress_cap, "seed {seed}: {}", r.table());
            // Nobody waits out a dead member's membership or lease: 2.1 to
            // 7.2 s here (the bound is 0.67 s); up to 17.7 s when a member
            // reported dead was forgotten only two announce intervals later
            // and leases lasted 10 s.
            let t = r.t_all_s.unwrap();
            assert!(t < 9.0, "seed {seed}: {t:.1} s: {}", r.table());
        }
    }
}

/// A tenth of 40 members at 1 gbit go within the first 300 ms, holding and
/// leasing chunks: crashing, or shutting down cleanly (a leaving announce,
/// connections closed, as shoald does on SIGTERM).
#[test]
fn members_that_shut_down_cleanly_hand_their_chunks_on_at_once() {
    let sc = Scenario {
        churn: 0.1,
        churn_window_ms: 300,
        layer_bytes: 32 << 20,
        chunk_size: 1 << 20,
        rate: 1_000_000_000 / 8,
        seed: 1,
        ..base(40)
    };
    let crashed = run(sc.clone()).unwrap();
    let left = run(Scenario {
        churn_leaves: 1.0,
        ..sc
    })
    .unwrap();
    for r in [&crashed, &left] {
        sound(r);
        assert!(r.egress_ratio < 1.05, "{}", r.table());
    }
    let (tc, tl) = (crashed.t_all_s.unwrap(), left.t_all_s.unwrap());
    // Crashed: a dead holder of the only copies is found by stalling on
    // it (11.8 s here; 31 s when its watchers never asked it for chunks
    // the tracker had it serving but no frame had shown). Left: its
    // chunks are leasable at once (1.4 s; the bound is 0.54 s).
    assert!(tc < 15.0, "crashed: {tc:.1} s: {}", crashed.table());
    assert!(
        tl < 2.5 && tl < tc / 3.0,
        "left {tl:.2} s, crashed {tc:.2} s: {}",
        left.table()
    );
}

#[test]
fn an_origin_slower_than_the_stall_period_still_sends_one_copy() {
    // The origin needs 67 s to send the image once and every lessee's run
    // shares its link, so a run's first chunk takes longer than the 30 s
    // origin stall period: runs are slow, not stalled, and bytes moving say
    // so. Cutting them by the clock made the origin send 2.3–2.6 copies.
    for seed in 1..=2 {
        let r = run(Scenario {
            nodes: 16,
            layers: 2,
            layer_bytes: 8 << 20,
            rate: 2_000_000 / 8,
            rtt_us: 5_000,
            seed,
            ..Scenario::default()
        })
        .unwrap();
        sound(&r);
        assert!(r.egress_ratio < 1.02, "seed {seed}: {}", r.table());
        // Measured 1.97× and 1.82× (3.6× and 2.9× with cuts by the clock).
        let ratio = r.ratio_to_bound.unwrap();
        assert!(ratio < 2.5, "seed {seed}: {ratio:.2}×: {}", r.table());
    }
}

#[test]
fn a_tracker_outage_mid_pull_falls_back_to_the_origin_and_completes() {
    let r = run(Scenario {
        tracker_outages: vec![Outage {
            from_ms: 300,
            until_ms: 3_000,
        }],
        ..base(20)
    })
    .unwrap();
    sound(&r);
    assert!(r.egress_ratio >= 1.0, "{}", r.table());
}

#[test]
fn racks_behind_narrow_uplinks_complete_sooner_when_members_say_their_rack() {
    let sc = Scenario {
        racks: 4,
        rack_uplink: Some(2 * 100_000_000 / 8),
        layer_bytes: 16 << 20,
        ..base(40)
    };
    let labelled = run(sc.clone()).unwrap();
    let unlabelled = run(Scenario {
        rack_labels: false,
        ..sc
    })
    .unwrap();
    for r in [&labelled, &unlabelled] {
        sound(r);
        assert!(r.egress_ratio < 1.05, "{}", r.table());
    }
    let (l, u) = (
        labelled.ratio_to_bound.unwrap(),
        unlabelled.ratio_to_bound.unwrap(),
    );
    eprintln!("racks said {l:.3}× the bound, not said {u:.3}×");
    assert!(l < 0.95 * u, "racks said {l:.3}× against {u:.3}×");
}

#[test]
fn the_fair_share_and_water_filling_are_bounded_approximations_of_max_min() {
    // The fair share never hands a flow more than max-min would, so it is
    // never faster flow by flow; how much slower depends on how many flows
    // are limited elsewhere (23 % at 8 members on 25 mbit,
    // docs/BENCHMARKS.md). Water-filling hands on what such flows leave,
    // and comes within a few per cent of max-min (100 and 300 members at
    // 10 gbit in docs/BENCHMARKS.md, where the fair share is 5–8 % slow).
    // A whole run also moves with timing (the policy reacts to when chunks
    // land: one seed can swing by 10 %), so the means of three seeds are
    // compared.
    for (nodes, rate) in [(40, 100_000_000 / 8), (8, 25_000_000 / 8)] {
        let mean = |sharing: Sharing| {
            let total: f64 = (1..=3)
                .map(|seed| {
                    let r = run(Scenario {
                        rate,
                        layer_bytes: 16 << 20,
                        sharing,
                        seed,
                        ..base(nodes)
                    })
                    .unwrap();
                    sound(&r);
                    r.t_all_s.unwrap()
                })
                .sum();
            total / 3.0
        };
        let (a, b) = (mean(Sharing::FairShare), mean(Sharing::MaxMin));
        assert!(
            a >= b * 0.97 && a <= b * 1.35,
            "{nodes} members: fair share {a:.2} s against max-min {b:.2} s (means of 3 seeds)"
        );
        // Water-filling may give a flow more than max-min would (max-min
        // raises the least rate, not each one), so a run can be a little
        // faster too: 4.50 s against 4.65 s at 40 members.
        let w = mean(Sharing::WaterFill);
        assert!(
            w >= b * 0.9 && w <= b * 1.1,
            "{nodes} members: water-filling {w:.2} s against max-min {b:.2} s and the fair share {a:.2} s"
        );
    }
}

#[test]
fn members_pacing_their_uploads_never_send_faster_and_keep_the_links_bound() {
    let sc = Scenario {
        layer_bytes: 8 << 20,
        ..base(20)
    };
    let free = run(sc.clone()).unwrap();
    let cap = sc.rate / 2;
    let paced = run(Scenario {
        upload_cap: Some(cap),
        ..sc.clone()
    })
    .unwrap();
    sound(&free);
    sound(&paced);
    assert_eq!(paced.bound_s, free.bound_s, "the bound is the links'");
    let t = paced.t_all_s.unwrap();
    let most_sent = paced.up_per_node.max * sc.image_bytes() as f64;
    assert!(
        most_sent <= cap as f64 * t * 1.001,
        "a member sent {most_sent:.0} bytes in {t:.2} s at a cap of {cap} B/s: {}",
        paced.table()
    );
    // Peers carry most of the image, at half the rate.
    assert!(
        t > free.t_all_s.unwrap() * 1.2,
        "paced {t:.2} s against {:.2} s: {}",
        free.t_all_s.unwrap(),
        paced.table()
    );
}

#[test]
fn headers_take_their_share_of_every_link() {
    let sc = Scenario {
        layer_bytes: 8 << 20,
        ..base(1)
    };
    let bare = run(sc.clone()).unwrap();
    let framed = run(Scenario {
        header_share: 0.2,
        ..sc.clone()
    })
    .unwrap();
    sound(&bare);
    sound(&framed);
    assert_eq!(framed.bound_s, bare.bound_s, "the bound is the links'");
    // Alone, the member gets the image from the origin at 80 % of the rate.
    let t = framed.t_all_s.unwrap();
    let payload = sc.image_bytes() as f64 / (sc.rate as f64 * 0.8);
    assert!(
        (payload..payload * 1.05).contains(&t),
        "{t:.3} s against {payload:.3} s for the blob bytes alone: {}",
        framed.table()
    );
    let slower = t / bare.t_all_s.unwrap();
    assert!((1.2..1.3).contains(&slower), "{slower:.3}× slower");
}

/// `sc` with the tracker's lease cap (the default) and with every chunk
/// leasable at once; both sound, the origin sending the image once.
fn capped_and_all_at_once(sc: Scenario) -> (Report, Report) {
    let capped = run(sc.clone()).unwrap();
    let all_at_once = run(Scenario {
        blob_lease_bytes: Some(u64::MAX),
        ..sc
    })
    .unwrap();
    for r in [&capped, &all_at_once] {
        sound(r);
        assert!(r.egress_ratio < 1.01, "{}", r.table());
    }
    (capped, all_at_once)
}

#[test]
fn a_tracker_with_a_long_queue_does_not_starve_the_origin() {
    // A lease is out for the tracker's queue on top of its chunks' time at
    // the origin; the cap stretches by the ratio. With a 16 MiB cap that
    // did not, a saturated tracker (1,000 members on 2 cores) held the
    // origin to 5.8× the bound against 2.2× with every chunk leasable at
    // once (docs/BENCHMARKS.md). Here one core takes 2 ms a request and
    // the start's burst queues 0.6 s: the origin was done at 5.5 s with a
    // fixed cap, 0.33 s stretched, 0.22 s with every chunk leasable.
    let sc = Scenario {
        nodes: 60,
        layers: 2,
        layer_bytes: 100 << 20,
        chunk_size: 1 << 20,
        rate: 10_000_000_000 / 8,
        sharing: Sharing::FairShare,
        tracker_us: 2_000,
        tracker_serial_us: 2_000,
        ..Scenario::default()
    };
    let (capped, all_at_once) = capped_and_all_at_once(sc);
    let (a, b) = (capped.origin_done_s, all_at_once.origin_done_s);
    assert!(
        a < b * 2.0,
        "origin done at {a:.2} s capped, {b:.2} s all at once: {}",
        capped.table()
    );
}

#[test]
fn at_10_gbit_the_origin_leases_a_few_chunks_at_a_time_and_members_start_sooner() {
    // Every chunk leased at once shares the origin's link among all of
    // them: each arrives late and members wait. Measured 1.33× with 16 MiB
    // of a blob at the origin at once (the default), 1.56× with 64 MiB,
    // 1.68× with no cap (seeds 1 and 2, docs/BENCHMARKS.md).
    let sc = Scenario {
        nodes: 50,
        layers: 3,
        layer_bytes: 200 << 20,
        chunk_size: 1 << 20,
        rate: 10_000_000_000 / 8,
        sharing: Sharing::FairShare,
        ..Scenario::default()
    };
    let (capped, all_at_once) = capped_and_all_at_once(sc);
    let (a, b) = (
        capped.ratio_to_bound.unwrap(),
        all_at_once.ratio_to_bound.unwrap(),
    );
    assert!(a < 1.5, "{a:.2}× the bound: {}", capped.table());
    assert!(
        b > a * 1.15,
        "16 MiB at a time {a:.2}×, all at once {b:.2}×: {}",
        capped.table()
    );
}

/// 60 members at 10 gbit and a tracker of 8 cores that takes 2 ms a
/// request (1.5 ms of it under the core's lock), as it is and as `without`
/// changes it; both runs sound and at one copy of origin egress.
fn slow_tracker_with_and_without(without: impl FnOnce(Scenario) -> Scenario) -> (Report, Report) {
    let sc = Scenario {
        nodes: 60,
        layers: 2,
        layer_bytes: 50 << 20,
        chunk_size: 1 << 20,
        rate: 10_000_000_000 / 8,
        sharing: Sharing::FairShare,
        tracker_cores: 8,
        tracker_us: 2_000,
        tracker_serial_us: 1_500,
        ..Scenario::default()
    };
    let with = run(sc.clone()).unwrap();
    let other = run(without(sc)).unwrap();
    for r in [&with, &other] {
        sound(r);
        assert!(r.egress_ratio < 1.01, "{}", r.table());
    }
    (with, other)
}

#[test]
fn lookups_share_a_slow_tracker_core_and_everyone_finishes_sooner() {
    // The tracker answers lookups under the shared side of its lock, many
    // on every core at once; writes hold it alone. With most of a
    // request's 2 ms under the lock (as a lookup's 45 µs of core work at
    // 10,000 members dwarfs the rest), the shared lock took the pull from
    // 1.18–1.24 s to 1.05–1.08 s and the longest wait from 0.39–0.41 s to
    // 0.34–0.35 s (seeds 1–3).
    let (shared, alone) = slow_tracker_with_and_without(|sc| Scenario {
        shared_lookups: false,
        ..sc
    });
    let (a, b) = (shared.t_all_s.unwrap(), alone.t_all_s.unwrap());
    assert!(a < b * 0.97, "{a:.3} s shared against {b:.3} s alone");
    let (wa, wb) = (
        shared.counters.tracker_max_wait_us,
        alone.counters.tracker_max_wait_us,
    );
    assert!(
        wa < wb,
        "longest tracker wait {wa} µs shared, {wb} µs alone"
    );
}

#[test]
fn a_members_downloads_announce_together_to_a_slow_tracker() {
    // Each download announces its own blob; with one of the member's
    // announces on its way the others wait merged into one. With the
    // tracker 2 ms a request (8 cores) the announces went from 367 to 256
    // and the pull from 1.23 s to 1.05 s (seed 1). Where the tracker
    // answers at once nothing waits, so nothing merges.
    let (merged, separate) = slow_tracker_with_and_without(|sc| Scenario {
        merge_announces: false,
        ..sc
    });
    let announces = |r: &Report| r.counters.tracker_by_kind[3];
    assert!(
        announces(&merged) * 10 < announces(&separate) * 8,
        "{} announces merged, {} separate",
        announces(&merged),
        announces(&separate)
    );
    let (a, b) = (merged.t_all_s.unwrap(), separate.t_all_s.unwrap());
    assert!(a < b, "{a:.3} s merged against {b:.3} s separate");
}
