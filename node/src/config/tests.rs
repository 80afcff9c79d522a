use super::*;

#[test]
fn api_keys_are_checked_and_compared_whole() {
    let key = ApiKey::new("0123456789abcdef").unwrap();
    assert!(key.matches(b"0123456789abcdef"));
    assert!(!key.matches(b"0123456789abcde"));
    assert!(!key.matches(b""));
    assert!(ApiKey::new("short").is_err());
    assert!(ApiKey::new("0123456789 abcdef").is_err());
    assert_eq!(format!("{key:?}"), "ApiKey(…)");
    let file = FileConfig::parse("[api]\nkey = \"x\"\n", "t").unwrap();
    let err = file.validate().unwrap_err().to_string();
    assert!(err.contains("api.key"), "{err}");
    assert!(FileConfig::parse("[api]\nkee = \"x\"\n", "t").is_err(), "unknown fields are refused");
}

#[test]
fn shipped_config_parses_and_validates() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/node.toml");
    let cfg = FileConfig::load(Path::new(path)).expect("configs/node.toml parses").validate().expect("valid");
    assert_eq!(cfg.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES);
    assert_eq!(cfg.send_queue_bytes, DEFAULT_SEND_QUEUE_BYTES);
    assert_eq!(cfg.send_queue_low_water_bytes, DEFAULT_SEND_QUEUE_LOW_WATER_BYTES);
    assert_eq!(cfg.slow_consumer, Duration::from_millis(DEFAULT_SLOW_CONSUMER_MS));
    assert_eq!(cfg.backbone, BackboneKind::Redis);
    // The shipped file leaves it to the descriptor limit.
    assert!(!cfg.connection_limit.configured);
    let nofile = tether_proto::limits::current_nofile().expect("readable on Linux");
    assert_eq!(cfg.max_connections, tether_proto::limits::derive_max_connections(nofile, FDS_PER_CONNECTION));
}

#[test]
fn trusted_proxies_default_to_loopback_and_bad_entries_are_named() {
    let cfg = FileConfig::parse("", "t").unwrap().validate().unwrap();
    let nets: Vec<String> = cfg.trusted_proxies.iter().map(ToString::to_string).collect();
    assert_eq!(nets, ["127.0.0.0/8", "::1/128"]);
    let cfg = FileConfig::parse("trusted_proxies = []", "t").unwrap().validate().unwrap();
    assert!(cfg.trusted_proxies.is_empty());
    let cfg = FileConfig::parse("trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.1\"]", "t").unwrap().validate().unwrap();
    assert_eq!(cfg.trusted_proxies.len(), 2);
    let err = FileConfig::parse("trusted_proxies = [\"10.0.0.0/8\", \"nope\"]", "t")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("trusted_proxies") && err.contains("entry 1") && err.contains("nope"), "{err}");
}

#[test]
fn advertise_is_required_on_every_interface_and_checked() {
    let v = |toml: &str| FileConfig::parse(toml, "t").unwrap().validate();
    let err = v("listen = \"0.0.0.0:9001\"").unwrap_err().to_string();
    assert!(err.contains("advertise") && err.contains("required"), "{err}");
    assert!(v("listen = \"[::]:9001\"").unwrap_err().to_string().contains("advertise"));
    let cfg = v("listen = \"0.0.0.0:9001\"\nadvertise = \"10.1.2.3:9001\"").unwrap();
    assert_eq!((cfg.advertise.as_deref(), cfg.announce), (Some("10.1.2.3:9001"), true));
    // Not announcing (or no registry at all): nothing to advertise.
    assert!(!v("listen = \"0.0.0.0:9001\"\nannounce = false").unwrap().announce);
    assert!(!v("listen = \"0.0.0.0:9001\"\nbackbone = \"none\"").unwrap().announce);
    for bad in ["0.0.0.0:9001", "[::]:1", "host:0", "nohost"] {
        let err = v(&format!("advertise = \"{bad}\"")).unwrap_err().to_string();
        assert!(err.contains("advertise"), "{bad}: {err}");
    }
    assert_eq!(v("").unwrap().advertise, None, "default: the address bound");
}

#[test]
fn explicit_max_connections_wins() {
    let cfg = FileConfig::parse("max_connections = 7", "t").unwrap().validate().unwrap();
    assert_eq!((cfg.max_connections, cfg.connection_limit.configured), (7, true));
    let err = FileConfig::parse("max_connections = 0", "t").unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("max_connections"), "{err}");
}

#[test]
fn unknown_fields_and_zeros_are_refused_by_name() {
    let err = FileConfig::parse("listn = \"x\"", "t").unwrap_err().to_string();
    assert!(err.contains("listn"), "{err}");
    let err = FileConfig::parse("send_queue_len = 0", "t").unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("send_queue_len"), "{err}");
    let err = FileConfig::parse("listen = \"nowhere\"", "t").unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("listen"), "{err}");
    let err = FileConfig::parse("name = \"a b\"", "t").unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("name"), "{err}");
    let cfg =
        FileConfig::parse("backbone = \"nats\"\nnats = \"nats://127.0.0.1:4333\"", "t").unwrap().validate().unwrap();
    assert_eq!((cfg.backbone, cfg.nats.as_str()), (BackboneKind::Nats, "nats://127.0.0.1:4333"));
    let err = FileConfig { nats: Some("http://x".into()), ..Default::default() }.validate().unwrap_err();
    assert!(err.to_string().contains("nats"), "{err}");
    let err = FileConfig::parse("send_queue_low_water_bytes = 9000000", "t").unwrap().validate().unwrap_err();
    assert!(err.to_string().contains("send_queue_low_water_bytes"), "{err}");
    let err = FileConfig::parse("slow_consumer_ms = 0", "t").unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("slow_consumer_ms"), "{err}");
    // An older config's write_buffer_bytes still starts (ignored, with a warning).
    assert!(FileConfig::parse("write_buffer_bytes = 4096", "t").unwrap().validate().is_ok());
    // A small hard cap brings the default low-water mark down below it.
    let cfg = FileConfig::parse("send_queue_bytes = 131072", "t").unwrap().validate().unwrap();
    assert_eq!(cfg.send_queue_low_water_bytes, 65536);
    for bad in ["threads = 0", "threads = 100000"] {
        let err = FileConfig::parse(bad, "t").unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("threads"), "{bad}: {err}");
    }
    assert_eq!(FileConfig::parse("threads = 1", "t").unwrap().validate().unwrap().threads, 1);
    let err = FileConfig::parse("backbone = \"kafka\"", "t").unwrap_err().to_string();
    assert!(err.contains("backbone") || err.contains("kafka"), "{err}");
}

#[test]
fn webhooks_are_validated_and_refused_on_nats() {
    let ok = "[webhooks]\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"s\"\noffline_grace_ms = 200";
    let cfg = FileConfig::parse(ok, "t").unwrap().validate().unwrap();
    assert_eq!(cfg.webhooks.unwrap().offline_grace, Duration::from_millis(200));
    let on_none = format!("backbone = \"none\"\n{ok}");
    assert!(FileConfig::parse(&on_none, "t").unwrap().validate().unwrap().webhooks.is_some());
    let on_nats = format!("backbone = \"nats\"\n{ok}");
    let err = FileConfig::parse(&on_nats, "t").unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("webhooks") && err.contains("nats"), "{err}");
    let https = "[webhooks]\nurl = \"https://h/\"\nsecret = \"s\"";
    let err = FileConfig::parse(https, "t").unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("webhooks.url"), "{err}");
    assert!(FileConfig::parse("", "t").unwrap().validate().unwrap().webhooks.is_none());
}

#[test]
fn nats_lists_every_server_and_replicas_follow_its_length() {
    let parse = |text: &str| FileConfig::parse(text, "t").unwrap().validate();
    let cfg = parse("").unwrap();
    assert_eq!((nats_servers(&cfg.nats), cfg.nats_replicas), (vec![DEFAULT_NATS], 1));
    let cfg = parse("nats = \"nats://a:1, nats://b:2,nats://c:3\"").unwrap();
    assert_eq!(nats_servers(&cfg.nats), ["nats://a:1", "nats://b:2", "nats://c:3"]);
    assert_eq!(cfg.nats_replicas, 3);
    assert_eq!(parse("nats = \"nats://a:1,nats://b:2\"").unwrap().nats_replicas, 1);
    let cfg = parse("nats = \"nats://a:1,nats://b:2,nats://c:3\"\nnats_replicas = 1").unwrap();
    assert_eq!(cfg.nats_replicas, 1);
    for bad in ["nats_replicas = 0", "nats_replicas = 6"] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains("nats_replicas") && err.contains("1..=5"), "{bad}: {err}");
    }
    for (bad, names) in [
        ("nats = \"nats://a:1,http://b:2\"", "server 2 of 2"),
        ("nats = \"nats://a:1,nats://b:notaport\"", "server 2 of 2"),
        ("nats = \" , \"", "no server"),
    ] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains("`nats`") && err.contains(names), "{bad}: {err}");
    }
}

#[test]
fn redis_cluster_urls_list_seeds_and_bad_lists_are_refused() {
    let cfg = FileConfig::parse("redis = \"redis+cluster://127.0.0.1:7000,h2:7001\"", "t").unwrap().validate().unwrap();
    let seeds = cfg.redis_cluster.unwrap();
    assert_eq!(seeds, vec!["redis://127.0.0.1:7000/".to_string(), "redis://h2:7001/".to_string()]);
    assert!(FileConfig::parse("", "t").unwrap().validate().unwrap().redis_cluster.is_none());
    for bad in [
        "redis+cluster://",
        "redis+cluster://h1",
        "redis+cluster://h1:7000,",
        "redis+cluster://h1:0",
        "redis+cluster://:7000",
        "redis+cluster://h1:99999",
        "redis+cluster://u@h1:7000",
    ] {
        let err = FileConfig::parse(&format!("redis = \"{bad}\""), "t").unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("redis") && err.contains("HOST:PORT"), "{bad}: {err}");
    }
    let hooks = "redis = \"redis+cluster://h1:7000\"\n[webhooks]\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"s\"";
    let err = FileConfig::parse(hooks, "t").unwrap().validate().unwrap_err().to_string();
    assert!(err.contains("webhooks") && err.contains("Redis Cluster"), "{err}");
}

#[test]
fn default_name_is_host_and_port() {
    let cfg = FileConfig { listen: Some("127.0.0.1:9555".into()), ..Default::default() }.validate().unwrap();
    assert!(cfg.name.ends_with(":9555"), "{}", cfg.name);
}
