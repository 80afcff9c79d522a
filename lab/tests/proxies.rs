//! `tether bench proxies` in its smoke sizes, end to end over TLS: real echo backends, a real
//! HAProxy (`/usr/sbin/haproxy`; the test fails rather than skips without it) terminating TLS
//! with the run's certificate, real `wss` clients in process and in load-generator children.
//! No timing is asserted — only that every workload measured something over the pinned TLS
//! 1.3 suite, with full hand-shakes unless resumption was asked for, and that a balancer which
//! cannot terminate TLS is reported as such instead of hanging the run.

use anyhow::Result;
use tether_lab::bench::proxies::{self, Kind, ProxiesOptions, Workloads};

fn quick_tls(targets: Vec<Kind>, resume: bool) -> ProxiesOptions {
    ProxiesOptions {
        targets,
        workloads: Workloads {
            rounds: 1,
            secs: 0.5,
            echo_conns: 20,
            rate_conns: 10,
            rate: 500.0,
            setup_concurrency: 8,
            idle: 100,
            message_bytes: 64,
            connect_rate: 100.0,
            tls: true,
            tls_resume: resume,
        },
        install: false,
        logs: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_quick_measures_haproxy_over_full_handshakes_and_keeps_direct_plain() -> Result<()> {
    let opts = quick_tls(vec![Kind::Direct, Kind::Balancer, Kind::Haproxy], false);
    let mut progress = Vec::new();
    let report = proxies::run(&opts, &mut progress).await?;
    let table = report.table();
    let progress = String::from_utf8_lossy(&progress);

    let h = report.targets.iter().find(|t| t.target == "HAProxy").expect("HAProxy measured");
    assert!(h.errors.is_empty(), "{table}\n{progress}");
    let negotiated = h.tls.as_deref().expect("HAProxy spoke TLS");
    assert!(negotiated.starts_with("TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519, ALPN http/1.1, full"), "{negotiated}");
    assert!(h.echo_per_sec[0] > 0.0 && h.cpu_us_per_echo.len() == 1, "{table}");
    assert_eq!(h.p50_us.len(), 1, "{table}");
    assert!(h.setups_per_sec[0] > 0.0 && h.setup_cpu_us_per_cycle.len() == 1, "{table}");
    assert!(h.handshake_p50_us[0] > 0.0 && h.handshake_p99_us[0] >= h.handshake_p50_us[0], "{table}");
    assert!(h.rate_upgrade_p50_us[0] >= h.handshake_p50_us[0], "the 101 comes after the hand-shake: {table}");
    assert_eq!(h.rate_cpu_us_per_setup.len(), 1, "{table}");
    assert_eq!(h.idle_open, [100.0], "every idle worker connection opened over TLS: {table}");
    assert_eq!(h.resumed, 0, "no session is resumed without --tls-resume: {table}");

    let d = report.targets.iter().find(|t| t.target == "direct").expect("direct measured");
    assert!(d.tls.is_none() && d.handshake_p50_us.is_empty(), "direct stays plain: {table}");
    assert!(d.echo_per_sec[0] > 0.0, "{table}");

    // The balancer of this tree may or may not terminate TLS: with the flags it is measured
    // over TLS like the others; without them it is skipped, saying why, and the run goes on.
    let program = tether_kit::bin_path(tether_kit::BALANCER_BIN)?;
    if tether_lab::bench::supports_flag(&program, "--tls-cert").await {
        let b = report.targets.iter().find(|t| t.target == "tether-balancer").expect("balancer measured");
        assert!(b.tls.as_deref().is_some_and(|n| n.contains("TLS13_AES_128_GCM_SHA256")), "{table}");
        assert!(b.echo_per_sec[0] > 0.0 && b.handshake_p50_us[0] > 0.0, "{table}");
    } else {
        assert!(report.targets.iter().all(|t| t.target != "tether-balancer"), "{table}");
        assert!(
            report.skipped.iter().any(|s| s.starts_with("tether-balancer:") && s.contains("no --tls-cert flag")),
            "{:?}",
            report.skipped
        );
    }

    for row in ["| (c) fixed rate: TCP + TLS hand-shake p99, µs |", "| (c) proxy CPU per cycle, µs |"] {
        assert!(table.contains(row), "{row} in\n{table}");
    }
    assert!(table.contains("session resumption off: every connect is a full hand-shake"), "{table}");
    let json = serde_json::to_value(&report)?;
    assert_eq!(json["tls"]["resume"], false);
    assert_eq!(json["connect_rate"], 100.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_resume_makes_haproxy_resume_sessions() -> Result<()> {
    let mut opts = quick_tls(vec![Kind::Haproxy], true);
    opts.workloads.idle = 10;
    let mut progress = Vec::new();
    let report = proxies::run(&opts, &mut progress).await?;
    let h = &report.targets[0];
    assert!(h.errors.is_empty(), "{}", report.table());
    assert!(h.resumed > 0, "with --tls-resume, repeated set-ups resume their sessions: {}", report.table());
    assert!(report.table().contains("session resumption on (--tls-resume)"));
    Ok(())
}
