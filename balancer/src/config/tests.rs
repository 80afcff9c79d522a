//! Tests of [`super`] (`config.rs`), kept apart so that the module itself stays readable.
use super::*;
use tether_proto::id::IdSource;

fn field_of(err: Error) -> String {
    match err {
        Error::Config { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

fn with_nodes(extra: &str) -> String {
    format!("{extra}\n[[nodes]]\nname = \"a\"\naddr = \"127.0.0.1:9001\"\n")
}

#[test]
fn shipped_config_file_parses_and_validates() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/balancer.toml");
    let config = FileConfig::load(Path::new(path)).and_then(|f| f.validate()).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
    assert_eq!(config.admin, DEFAULT_ADMIN.parse().unwrap());
    let names: Vec<_> = config.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node-1", "node-2", "node-3"]);
    assert_eq!(config.nodes[2].addr, "127.0.0.1:9003");
    assert_eq!(config.hash_keys, HashKeys::default());
    assert_eq!(config.rise, DEFAULT_RISE);
    assert!(config.signing_key.is_none(), "shipped commented out");
    assert!(config.tls.is_none(), "shipped commented out");
    assert!(!config.reuse_port);
    assert_eq!(config.threads, std::thread::available_parallelism().unwrap().get(), "shipped commented out");
}

#[test]
fn defaults_fill_absent_fields() {
    let config = FileConfig::parse(&with_nodes("")).unwrap().validate().unwrap();
    assert_eq!(config.health_interval, Duration::from_millis(DEFAULT_HEALTH_INTERVAL_MS));
    // From the descriptor limit, halved: a tunnel holds two sockets.
    let nofile = tether_proto::limits::current_nofile().expect("readable on Linux");
    assert_eq!(config.max_connections, tether_proto::limits::derive_max_connections(nofile, 2));
    assert!(!config.connection_limit.configured);
    assert_eq!(config.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
    assert_eq!(config.grace_period, Duration::from_millis(DEFAULT_GRACE_PERIOD_MS));
    assert_eq!(config.upgrade_timeout, Duration::from_secs(DEFAULT_UPGRADE_TIMEOUT_SECS));
    assert_eq!(config.upgrade_drain, Duration::from_secs(DEFAULT_UPGRADE_DRAIN_SECS));
}

#[test]
fn bad_values_are_rejected_naming_the_field() {
    let cases = [
        ("health_interval_ms = 0", "health_interval_ms"),
        ("health_timeout_ms = 0", "health_timeout_ms"),
        ("connect_timeout_ms = 0", "connect_timeout_ms"),
        ("header_read_timeout_ms = 0", "header_read_timeout_ms"),
        ("rise = 0", "rise"),
        ("max_connections = 0", "max_connections"),
        ("max_connections = 1000000000000", "max_connections"),
        ("max_header_bytes = 10", "max_header_bytes"),
        ("threads = 0", "threads"),
        ("threads = 100000", "threads"),
        ("hash_keys = []", "hash_keys"),
        ("hash_keys = [\"query\", \"body\"]", "hash_keys"),
        ("hash_keys = [\"query\", \"query\"]", "hash_keys"),
        ("hash_keys = [\"query:\"]", "hash_keys"),
        ("hash_keys = [\"query:a b\"]", "hash_keys"),
        ("hash_keys = [\"query:client\"]", "hash_keys"),
        ("hash_keys = [\"cookie\", \"query:room\"]", "hash_keys"),
        ("listen = \"localhost\"", "listen"),
        ("admin = \"1.2.3.4:x\"", "admin"),
        ("proxy_protocol = \"v3\"", "proxy_protocol"),
        ("proxy_protocol = \"\"", "proxy_protocol"),
        ("connect_rate_per_ip = -1", "connect_rate_per_ip"),
        ("connect_rate_per_ip = nan", "connect_rate_per_ip"),
        ("connect_rate_per_ip = inf", "connect_rate_per_ip"),
        ("connect_rate_per_ip = 1e9", "connect_rate_per_ip"),
        ("connect_burst_per_ip = 0", "connect_burst_per_ip"),
        ("connect_burst_per_ip = 4000000000", "connect_burst_per_ip"),
        ("upgrade_timeout_secs = 0", "upgrade_timeout_secs"),
        ("upgrade_timeout_secs = 86401", "upgrade_timeout_secs"),
        ("upgrade_drain_secs = 86401", "upgrade_drain_secs"),
    ];
    for (line, field) in cases {
        let file = FileConfig::parse(&with_nodes(line)).unwrap();
        assert_eq!(field_of(file.validate().unwrap_err()), field, "{line}");
    }
}

#[test]
fn a_query_placement_key_is_read_and_the_id_keeps_its_sources() {
    let config = FileConfig::parse(&with_nodes("hash_keys = [\"query:room\"]")).unwrap().validate().unwrap();
    assert_eq!(config.hash_keys.place_by, ["room"]);
    assert_eq!(config.hash_keys.id_order, IdSource::DEFAULT_ORDER, "ids still come from the usual sources");
    let config =
        FileConfig::parse(&with_nodes("hash_keys = [\"query:room\", \"header\"]")).unwrap().validate().unwrap();
    assert_eq!(config.hash_keys.id_order, [IdSource::Header]);
    let err = FileConfig::parse(&with_nodes("hash_keys = [\"query:\"]")).unwrap().validate().unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("config: hash_keys: ") && text.contains("empty"), "{text}");
}

#[test]
fn bad_node_lists_are_rejected_naming_the_field() {
    let empty = FileConfig::parse("").unwrap();
    assert_eq!(field_of(empty.validate().unwrap_err()), "nodes");

    let node = |name: &str, addr: &str| FileNode { name: name.into(), addr: addr.into() };
    let cases = [
        (vec![node("a", "h:1"), node("a", "h:2")], "nodes[1].name"),
        (vec![node("", "h:1")], "nodes[0].name"),
        (vec![node("a b", "h:1")], "nodes[0].name"),
        (vec![node("a", "h:1"), node("b", "h")], "nodes[1].addr"),
        (vec![node("a", "h:0")], "nodes[0].addr"),
        (vec![node("a", ":80")], "nodes[0].addr"),
        (vec![node("a", "h/x:80")], "nodes[0].addr"),
        (vec![node("a", "h:99999")], "nodes[0].addr"),
    ];
    for (nodes, field) in cases {
        let file = FileConfig { nodes: nodes.clone(), ..FileConfig::default() };
        assert_eq!(field_of(file.validate().unwrap_err()), field, "{nodes:?}");
    }
    let ok = FileConfig {
        nodes: vec![node("n1", "node-1.internal:9001"), node("n2", "[::1]:9002"), node("n3", "10.0.0.3:9003")],
        ..FileConfig::default()
    };
    assert!(ok.validate().is_ok());
}

#[test]
fn signing_key_comes_from_the_file_trimmed_else_from_the_environment() {
    let dir = std::env::temp_dir().join(format!("tether-balancer-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.key");
    std::fs::write(&good, "  0123456789abcdef-file\n").unwrap();
    let short = dir.join("short.key");
    // Seventeen bytes before trimming, fifteen after: too short.
    std::fs::write(&short, " 0123456789abcde\n").unwrap();

    let with = |file: Option<&Path>, env: Option<&str>| {
        let mut config = FileConfig::parse(&with_nodes("")).unwrap();
        config.apply(Overrides {
            signing_key_file: file.map(Path::to_owned),
            signing_key_env: env.map(|k| Secret(k.to_owned())),
            ..Overrides::default()
        });
        config.validate()
    };
    assert!(with(None, None).unwrap().signing_key.is_none());
    assert!(with(None, Some("")).unwrap().signing_key.is_none());

    // The file wins over the environment, and its content is trimmed.
    let key = with(Some(&good), Some("0123456789abcdef-env")).unwrap().signing_key.unwrap();
    let id = key.mint();
    let file_key = SigningKey::new(b"0123456789abcdef-file".to_vec()).unwrap();
    assert!(file_key.verify(&id));
    let env_key = with(None, Some("0123456789abcdef-env")).unwrap().signing_key.unwrap();
    assert!(!env_key.verify(&id));

    assert_eq!(field_of(with(Some(&short), None).unwrap_err()), "signing_key_file");
    assert_eq!(field_of(with(Some(&dir.join("missing")), None).unwrap_err()), "signing_key_file");
    let err = with(None, Some("too-short")).unwrap_err();
    assert!(!err.to_string().contains("too-short"), "{err}");
    assert_eq!(field_of(err), SIGNING_KEY_ENV);

    // The file key can be set in TOML; Debug output never shows key material.
    let toml = format!("signing_key_file = {:?}", good.to_str().unwrap());
    let file = FileConfig::parse(&with_nodes(&toml)).unwrap();
    let config = file.validate().unwrap();
    assert!(config.signing_key.is_some());
    let mut file = file;
    file.signing_key_env = Some(Secret("0123456789abcdef-env".into()));
    for debug in [format!("{config:?}"), format!("{file:?}")] {
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
    }
    // ...and the environment's key cannot come from the file.
    assert!(FileConfig::parse("signing_key_env = \"x\"").is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tls_needs_both_files_readable_pem_and_a_key_that_matches_the_certificate() {
    use tether_kit::certs::{DevCa, LOCAL_NAMES};
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("test CA").unwrap();
    let files = ca.write(dir.path()).unwrap();
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&other_key, ca.leaf(&LOCAL_NAMES).unwrap().key_pem).unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64 !!!\n-----END CERTIFICATE-----\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let toml = |cert: Option<&Path>, key: Option<&Path>| {
        let mut table = String::from("[tls]\n");
        if let Some(cert) = cert {
            table.push_str(&format!("cert = {:?}\n", cert.to_str().unwrap()));
        }
        if let Some(key) = key {
            table.push_str(&format!("key = {:?}\n", key.to_str().unwrap()));
        }
        // `[tls]` goes after the top-level keys and before `[[nodes]]`.
        FileConfig::parse(&format!("{table}[[nodes]]\nname = \"a\"\naddr = \"127.0.0.1:9001\"\n")).unwrap()
    };

    let good = toml(Some(&files.cert), Some(&files.key)).validate().unwrap();
    let tls = good.tls.expect("tls on");
    assert_eq!((tls.cert.as_path(), tls.key.as_path()), (files.cert.as_path(), files.key.as_path()));
    assert!(toml(None, None).validate().unwrap().tls.is_none(), "an empty [tls] is no TLS");

    let refused = |cert: Option<&Path>, key: Option<&Path>| match toml(cert, key).validate() {
        Err(Error::Config { field, reason }) => (field, reason),
        other => panic!("expected a config error, got {other:?}"),
    };
    // One without the other.
    assert_eq!(refused(Some(&files.cert), None).0, "tls.key");
    assert_eq!(refused(None, Some(&files.key)).0, "tls.cert");
    // A missing file, garbage, the wrong kind of PEM, a key of another certificate: each
    // names the field and the file.
    for (cert, key, field, named) in [
        (&missing, &files.key, "tls.cert", &missing),
        (&files.cert, &missing, "tls.key", &missing),
        (&garbage, &files.key, "tls.cert", &garbage),
        (&files.cert, &garbage, "tls.key", &garbage),
        (&files.key, &files.key, "tls.cert", &files.key),
        (&files.cert, &other_key, "tls.key", &other_key),
    ] {
        let (got, reason) = refused(Some(cert), Some(key));
        assert_eq!(got, field, "{reason}");
        assert!(reason.contains(named.to_str().unwrap()), "{reason}");
    }
    assert!(refused(Some(&files.cert), Some(&other_key)).1.contains("does not match"));
    assert!(FileConfig::parse("[tls]\ncertificate = \"x\"\n").is_err(), "unknown keys in [tls]");

    // The flags replace the file's table.
    let mut file = toml(Some(&missing), Some(&missing));
    file.apply(Overrides { tls: Some((files.cert.clone(), files.key.clone())), ..Overrides::default() });
    assert!(file.validate().unwrap().tls.is_some());
}

#[test]
fn front_door_keys_default_off_and_flags_override_them() {
    let config = FileConfig::parse(&with_nodes("")).unwrap().validate().unwrap();
    assert_eq!(config.proxy_protocol, ProxyProtocol::Off);
    assert_eq!((config.max_connections_per_ip, config.connect_rate_per_ip), (0, 0.0));
    assert_eq!(config.connect_burst_per_ip, 1);

    let mut file = FileConfig::parse(&with_nodes(
        "proxy_protocol = \"v1\"\nmax_connections_per_ip = 8\nconnect_rate_per_ip = 2.5",
    ))
    .unwrap();
    let config = file.validate().unwrap();
    assert_eq!(config.proxy_protocol, ProxyProtocol::V1);
    assert_eq!(config.max_connections_per_ip, 8);
    assert_eq!(config.connect_burst_per_ip, 3, "default burst: the rate rounded up");
    // An integer rate is accepted too.
    assert_eq!(
        FileConfig::parse(&with_nodes("connect_rate_per_ip = 10")).unwrap().validate().unwrap().connect_burst_per_ip,
        10
    );

    file.apply(Overrides {
        proxy_protocol: Some("any".into()),
        max_connections_per_ip: Some(2),
        connect_rate_per_ip: Some(0.5),
        connect_burst_per_ip: Some(5),
        ..Overrides::default()
    });
    let config = file.validate().unwrap();
    assert_eq!(config.proxy_protocol, ProxyProtocol::Any);
    assert_eq!((config.max_connections_per_ip, config.connect_rate_per_ip, config.connect_burst_per_ip), (2, 0.5, 5));
}

#[test]
fn unknown_keys_are_refused() {
    let err = FileConfig::parse("listne = \"127.0.0.1:1\"").unwrap_err();
    assert!(err.to_string().contains("listne"), "{err}");
    let err = FileConfig::parse("[[nodes]]\nname = \"a\"\naddress = \"h:1\"").unwrap_err();
    assert!(err.to_string().contains("address"), "{err}");
}

#[test]
fn flags_override_the_file_and_node_flags_replace_its_nodes() {
    let mut file = FileConfig::parse(&with_nodes(
        "listen = \"127.0.0.1:1000\"\nhealth_interval_ms = 900\nthreads = 3\nreuse_port = false",
    ))
    .unwrap();
    file.apply(Overrides {
        listen: Some("127.0.0.1:2000".into()),
        threads: Some(1),
        max_connections: Some(3),
        reuse_port: true,
        nodes: vec![parse_node_flag("x=127.0.0.1:1").unwrap(), parse_node_flag("y=127.0.0.1:2").unwrap()],
        ..Overrides::default()
    });
    let config = file.validate().unwrap();
    assert_eq!(config.listen.port(), 2000);
    assert_eq!(config.health_interval, Duration::from_millis(900));
    assert_eq!(config.threads, 1);
    assert_eq!((config.max_connections, config.connection_limit.configured), (3, true));
    assert!(config.reuse_port);
    let names: Vec<_> = config.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["x", "y"]);
    assert_eq!(field_of(parse_node_flag("nonsense").unwrap_err()), "--node");
}

#[test]
fn failover_defaults_to_reconnect_and_rehome_keys_are_checked() {
    let config = FileConfig::parse(&with_nodes("")).unwrap().validate().unwrap();
    assert_eq!(config.failover, Failover::Reconnect);
    assert_eq!(config.rehome_buffer_bytes, DEFAULT_REHOME_BUFFER_BYTES);
    assert_eq!(config.rehome_timeout, Duration::from_millis(DEFAULT_REHOME_TIMEOUT_MS));
    let text = with_nodes("failover = \"rehome\"\nrehome_buffer_bytes = 200000\nrehome_timeout_ms = 3000");
    let config = FileConfig::parse(&text).unwrap().validate().unwrap();
    assert_eq!((config.failover, config.rehome_buffer_bytes), (Failover::Rehome, 200_000));
    assert_eq!(config.rehome_timeout, Duration::from_secs(3));
    for (bad, field) in [
        ("failover = \"teleport\"", "failover"),
        ("rehome_buffer_bytes = 10", "rehome_buffer_bytes"),
        ("rehome_timeout_ms = 0", "rehome_timeout_ms"),
    ] {
        let err = FileConfig::parse(&with_nodes(bad)).unwrap().validate().unwrap_err();
        assert_eq!(field_of(err), field, "{bad}");
    }
    // The flags win over the file.
    let mut file = FileConfig::parse(&with_nodes("failover = \"rehome\"")).unwrap();
    file.apply(Overrides { failover: Some("reconnect".into()), ..Overrides::default() });
    assert_eq!(file.validate().unwrap().failover, Failover::Reconnect);
}

#[test]
fn balance_and_rebalance_default_to_the_seeds_promise_and_are_checked() {
    let config = FileConfig::parse(&with_nodes("")).unwrap().validate().unwrap();
    assert_eq!(config.balance, Balance::Hrw);
    assert_eq!(config.rebalance, Rebalance::Off);
    let text = with_nodes("balance = \"bounded\"\nload_factor = 1.5\nrebalance = \"paced\"\nrebalance_per_sec = 4");
    let config = FileConfig::parse(&text).unwrap().validate().unwrap();
    assert_eq!(config.balance, Balance::Bounded { factor_milli: 1500 });
    assert_eq!(config.rebalance, Rebalance::Paced { per_sec: 4.0 });
    for (bad, field) in [
        ("balance = \"least\"", "balance"),
        ("balance = \"bounded\"\nload_factor = 0.5", "load_factor"),
        ("load_factor = 0.99", "load_factor"),
        ("rebalance = \"now\"", "rebalance"),
        ("rebalance = \"paced\"\nrebalance_per_sec = 0", "rebalance_per_sec"),
        ("rebalance_per_sec = -3", "rebalance_per_sec"),
    ] {
        let err = FileConfig::parse(&with_nodes(bad)).unwrap().validate().unwrap_err();
        assert_eq!(field_of(err), field, "{bad}");
    }
    let mut file = FileConfig::parse(&with_nodes("balance = \"bounded\"")).unwrap();
    file.apply(Overrides {
        balance: Some("hrw".into()),
        rebalance: Some("paced".into()),
        rebalance_per_sec: Some(2.0),
        ..Overrides::default()
    });
    let config = file.validate().unwrap();
    assert_eq!((config.balance, config.rebalance), (Balance::Hrw, Rebalance::Paced { per_sec: 2.0 }));
}
