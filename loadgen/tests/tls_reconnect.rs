//! `--tls-reconnect` against a real TLS relay: a fresh handshake and a resumed one carry the
//! HELLO in the second client flight, a 0-RTT resume in the first; only the resumptions
//! skip the certificate.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use pabal_loadgen::profiles::builtin;
use pabal_loadgen::tls_reconnect::{Mode, ProbeConfig, run_probe};
use pabal_testkit::pki::TestPki;
use pabal_testkit::{TestRelay, per_backend};

per_backend! {
    fn reconnect_costs_two_round_trips_fresh_or_resumed_and_one_with_0rtt(backend) {
        let pki = TestPki::new();
        let (cert, key) = pki.issue();
        let relay = TestRelay::start(backend, 2, |c| {
            c.tls.cert_file = Some(cert);
            c.tls.key_file = Some(key);
        });
        let config = ProbeConfig {
            relay: relay.addr,
            tls: pki.client(),
            profiles: vec![builtin("lte").unwrap()],
            trials: 2,
            seed: 7,
            run_id: format!("probe-{backend:?}"),
            timeout: Duration::from_secs(30),
        };
        let reports = run_probe(&config).unwrap();
        let modes: Vec<Mode> = reports.iter().map(|r| r.mode).collect();
        assert_eq!(modes, Mode::ALL);
        let fresh_down = reports[0].trials[0].handshake_down_bytes;
        for report in &reports {
            for t in &report.trials {
                let expected = match report.mode {
                    Mode::Fresh => (2, false, false),
                    Mode::Resumed => (2, true, false),
                    Mode::ZeroRtt => (1, true, true),
                };
                assert_eq!((t.round_trips, t.resumed, t.early_data), expected, "{report:?}");
                assert!(t.handshake_up_bytes > 0, "{report:?}");
                if report.mode != Mode::Fresh {
                    assert!(
                        t.handshake_down_bytes < fresh_down,
                        "a resumption sends no certificate: {report:?}"
                    );
                }
            }
        }
        relay.stop();
    }
}
