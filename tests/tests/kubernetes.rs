//! `examples/kubernetes/`: every overlay renders with `kubectl kustomize`,
//! validates against the Kubernetes schemas (`kubernetes-validate --strict`),
//! says what an operator relies on (host network, probes, tolerations, the
//! DHT bootstrap Service, resources), passes only flags the binaries take,
//! and its init container points containerd at shoald without breaking a
//! `hosts.toml` that was there.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `prog args`, failing loudly if it is missing or fails.
fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{prog} is needed (scripts/test.sh installs it): {e}"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubernetes-validate` on PATH, or where `pip install --user` puts it.
fn validator() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    let user = format!("{home}/.local/bin/kubernetes-validate");
    if Path::new(&user).exists() {
        user
    } else {
        "kubernetes-validate".into()
    }
}

/// Renders an overlay, validates it, and returns its documents as JSON.
fn render(overlay: &str) -> Vec<Value> {
    let dir = repo().join("examples/kubernetes").join(overlay);
    let yaml = run("kubectl", &["kustomize", dir.to_str().unwrap()], None);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &yaml).unwrap();
    let report = run(
        &validator(),
        &["--strict", file.path().to_str().unwrap()],
        None,
    );
    assert!(!report.contains("ERROR"), "{overlay}: {report}");
    // PyYAML comes with kubernetes-validate.
    let json = run(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ],
        Some(&yaml),
    );
    serde_json::from_str(&json).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

/// Every `--flag` in `args` is one `BINARY SUBCOMMAND --help` lists.
fn flags_exist(binary: &str, sub: &[&str], args: &[String]) {
    let bin = shoal_tests::cluster::sibling_binary(binary).unwrap();
    let mut help_args: Vec<&str> = sub.to_vec();
    help_args.push("--help");
    let help = run(bin.to_str().unwrap(), &help_args, None);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{binary} does not take {flag}"
        );
    }
}

#[test]
fn the_base_runs_shoald_on_every_node_with_probes_resources_and_dht_bootstrap() {
    let docs = render("base");
    let ds = find(&docs, "DaemonSet", "shoald");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    let shoald = &pod["containers"][0];
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(shoald[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(shoald[probe]["httpGet"]["port"], 4903, "{probe}");
    }
    let a = args(shoald);
    for want in [
        "--registry-listen=127.0.0.1:4900",
        "--ops-listen=0.0.0.0:4903",
        "--dht-listen=0.0.0.0:4906",
        "--dht-bootstrap=shoal-peers.shoal.svc.cluster.local:4906",
        "--join-token-file=/etc/shoal/join/token",
        "--advertise=$(NODE_IP):4901",
    ] {
        assert!(
            a.iter().any(|x| x == want),
            "shoald args lack {want}: {a:?}"
        );
    }
    flags_exist("shoald", &["run"], &a);
    for c in pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap())
    {
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    }
    assert!(shoald["resources"]["limits"]["memory"].is_string());
    assert!(shoald["resources"]["requests"]["cpu"].is_string());
    let volumes = pod["volumes"].as_array().unwrap();
    for path in ["/var/lib/shoal/data", "/etc/containerd/certs.d"] {
        assert!(
            volumes.iter().any(|v| v["hostPath"]["path"] == path),
            "no hostPath {path}"
        );
    }
    // The join Secret holds ca.crt and a token, never the CA key.
    assert!(volumes
        .iter()
        .any(|v| v["secret"]["secretName"] == "shoal-join"));

    let peers = find(&docs, "Service", "shoal-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    assert_eq!(peers["spec"]["ports"][0]["port"], 4906);
    assert_eq!(
        peers["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );

    let tracker = find(&docs, "Deployment", "shoal-tracker");
    let t = &tracker["spec"]["template"]["spec"]["containers"][0];
    flags_exist("shoal-tracker", &[], &args(t));
    assert_eq!(t["readinessProbe"]["httpGet"]["port"], 4904);
    let svc = find(&docs, "Service", "shoal-tracker");
    let ports: Vec<i64> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [4902, 4905, 4904]);
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], "shoal", "{}", d["kind"]);
        }
    }
}

#[test]
fn the_ha_overlay_runs_tracker_replicas_over_redis() {
    let docs = render("overlays/ha");
    let tracker = find(&docs, "Deployment", "shoal-tracker");
    assert_eq!(tracker["spec"]["replicas"], 2);
    let a = args(&tracker["spec"]["template"]["spec"]["containers"][0]);
    assert!(
        a.iter()
            .any(|x| x == "--store=redis://shoal-redis.shoal.svc:6379"),
        "{a:?}"
    );
    flags_exist("shoal-tracker", &[], &a);
    find(&docs, "Deployment", "shoal-redis");
    find(&docs, "Service", "shoal-redis");
    find(&docs, "DaemonSet", "shoald");
}

#[test]
fn the_webhook_overlay_lets_the_origin_registry_preheat() {
    let docs = render("overlays/webhook");
    let tracker = find(&docs, "Deployment", "shoal-tracker");
    let spec = &tracker["spec"]["template"]["spec"];
    let a = args(&spec["containers"][0]);
    flags_exist("shoal-tracker", &[], &a);
    assert!(
        a.iter()
            .any(|x| x == "--webhook-secret-file=/etc/shoal/webhook/secret"),
        "{a:?}"
    );
    assert!(a.iter().any(|x| x.starts_with("--preheat-repo=")), "{a:?}");
    assert!(spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["secret"]["secretName"] == "shoal-webhook"));
    find(&docs, "DaemonSet", "shoald");
}

#[test]
fn the_prometheus_overlay_scrapes_both_ops_ports() {
    let docs = render("overlays/prometheus-operator");
    for name in ["shoald", "shoal-tracker"] {
        let pm = find(&docs, "PodMonitor", name);
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "ops");
        assert_eq!(
            pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            name
        );
    }
}

/// The init container's `shoald configure containerd`, run against a
/// directory standing in for the node's `/etc/containerd/certs.d`: it
/// writes a `hosts.toml` per origin (shoald first, the origin as the
/// fallback), keeps a `hosts.toml` it did not write as
/// `hosts.toml.before-shoal`, and running it again (a pod restart) changes
/// nothing else. The image has no shell: every container runs a Shoal
/// binary.
#[test]
fn the_init_container_points_containerd_at_shoald_and_keeps_what_was_there() {
    let docs = render("base");
    let ds = find(&docs, "DaemonSet", "shoald");
    let pod = &ds["spec"]["template"]["spec"];
    for c in pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_array().unwrap())
    {
        assert_eq!(c["command"][0], "shoald", "{}", c["name"]);
    }
    let init = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "containerd-hosts")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let init_args: Vec<String> = args(init)
        .into_iter()
        .map(|a| a.replace("/host/etc/containerd/certs.d", certs.to_str().unwrap()))
        .collect();
    assert_eq!(init_args[..2], ["configure", "containerd"]);
    flags_exist("shoald", &["configure", "containerd"], &init_args);
    let origins: Vec<String> = init_args
        .iter()
        .filter_map(|a| a.strip_prefix("--origin="))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        origins,
        ["docker.io", "quay.io", "ghcr.io", "registry.k8s.io"]
    );

    let theirs = "server = \"https://mirror.example.internal\"\n";
    std::fs::create_dir_all(certs.join("quay.io")).unwrap();
    std::fs::write(certs.join("quay.io/hosts.toml"), theirs).unwrap();
    let shoald = shoal_tests::cluster::sibling_binary("shoald").unwrap();
    for _ in 0..2 {
        let out = Command::new(&shoald).args(&init_args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for origin in &origins {
        let text = std::fs::read_to_string(certs.join(origin).join("hosts.toml")).unwrap();
        let t: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{origin}: {e}"));
        let server = if origin == "docker.io" {
            "https://registry-1.docker.io".to_owned()
        } else {
            format!("https://{origin}")
        };
        assert_eq!(t["server"].as_str(), Some(server.as_str()), "{origin}");
        let host = &t["host"]["http://127.0.0.1:4900"];
        let caps: Vec<&str> = host["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(caps, ["pull", "resolve"], "{origin}");
    }
    assert_eq!(
        std::fs::read_to_string(certs.join("quay.io/hosts.toml.before-shoal")).unwrap(),
        theirs,
        "the hosts.toml that was there is kept, once"
    );
    assert!(!certs.join("docker.io/hosts.toml.before-shoal").exists());
}
