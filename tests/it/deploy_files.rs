//! The deployment files under deploy/ are valid and say what the server
//! needs: the systemd unit (parsed, and `systemd-analyze verify` where
//! systemd is installed) and the Kubernetes manifests (parsed and checked
//! field by field, the ConfigMap's config loaded by the real config code,
//! and the schemas checked by `kubernetes-validate` from PyPI).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use imgsvc::config::{ConfigSource, Settings};
use serde_yaml::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

// ---------------------------------------------------------------- systemd

/// `[Section]` → key → every value given (keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_string());
            sections.entry(name.to_string()).or_default();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("line {}: not KEY=VALUE: {line}", n + 1));
        let section = current.clone().unwrap_or_else(|| panic!("line {}: key outside a section", n + 1));
        sections.get_mut(&section).unwrap().entry(key.to_string()).or_default().push(value.to_string());
    }
    sections
}

#[test]
fn systemd_unit_is_type_notify_checks_config_and_is_hardened() {
    let unit = parse_unit(&std::fs::read_to_string(deploy("systemd/imgsvc.service")).unwrap());
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        let values = service.get(key).unwrap_or_else(|| panic!("[Service] has no {key}="));
        assert_eq!(values.len(), 1, "{key} is set more than once");
        &values[0]
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("User"), "imgsvc");
    assert!(one("ExecStartPre").contains("--check-config"));
    assert!(one("ExecStart").contains("--config /etc/imgsvc/imgsvc.toml"));
    assert_eq!(service["ExecReload"].last().unwrap(), "/bin/kill -HUP $MAINPID");
    assert!(service["ExecReload"][0].contains("--check-config"));
    assert!(one("LoadCredential").starts_with("server-key.pem:"));
    assert_eq!(one("Environment"), "IMGSVC_TLS__KEY=%d/server-key.pem");
    assert_eq!(one("RestartPreventExitStatus"), imgsvc::EXIT_CONFIG.to_string());
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
        ("ReadOnlyPaths", "/etc/imgsvc"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    // The stop timeout leaves room for the default 30 s drain.
    assert_eq!(one("TimeoutStopSec"), "45s");
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if !Command::new("systemd-analyze").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: systemd-analyze is not installed (Debian package systemd); the unit was only parsed");
        return;
    }
    // verify checks that the executables exist: point the unit at the
    // binary cargo built.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(deploy("systemd/imgsvc.service"))
        .unwrap()
        .replace("/usr/local/bin/imgsvc-server", env!("CARGO_BIN_EXE_imgsvc-server"));
    let path = dir.path().join("imgsvc.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    // verify exits 0 on unknown keys and bad values too: it must say nothing.
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

// ------------------------------------------------------------- kubernetes

fn manifests() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            docs.push((file.file_name().unwrap().to_string_lossy().into_owned(), value));
        }
    }
    docs
}

use serde::Deserialize;

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[key],
    })
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path).as_str().unwrap_or_else(|| panic!("{path} is not a string: {:?}", get(v, path)))
}

fn one_of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|(_, d)| d["kind"] == kind).map(|(_, d)| d).collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

#[test]
fn kubernetes_manifests_have_the_required_fields_and_agree_with_each_other() {
    let docs = manifests();
    for (file, doc) in &docs {
        for key in ["apiVersion", "kind"] {
            assert!(doc[key].is_string(), "{file}: {key}");
        }
        assert!(get(doc, "metadata.name").is_string(), "{file}: metadata.name");
    }

    // The config the pods run is a valid config, pointing into the mounts.
    let config_map = one_of_kind(&docs, "ConfigMap");
    let toml = config_map["data"]["imgsvc.toml"].as_str().expect("data.\"imgsvc.toml\"");
    let settings = Settings::load_with_env(&ConfigSource::Inline { name: "configmap.yaml".into(), toml: toml.into() }, [])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!settings.tls.dev_auto_certs);

    let deployment = one_of_kind(&docs, "Deployment");
    let pod = get(deployment, "spec.template.spec");
    let pod_labels = get(deployment, "spec.template.metadata.labels");
    assert_eq!(get(deployment, "spec.selector.matchLabels"), pod_labels);
    assert_eq!(get(pod, "securityContext.runAsNonRoot"), &Value::Bool(true));
    let containers = get(pod, "containers").as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    // The image deploy/container/build.sh builds (tests/container.rs runs it).
    assert_eq!(str_at(c, "image"), format!("localhost/imgsvc:{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(get(pod, "securityContext.runAsUser").as_u64(), Some(10001), "the image's user");
    assert_eq!(get(c, "securityContext.readOnlyRootFilesystem"), &Value::Bool(true));
    assert_eq!(get(c, "securityContext.allowPrivilegeEscalation"), &Value::Bool(false));
    assert_eq!(get(c, "securityContext.capabilities.drop.0"), "ALL");
    for path in ["resources.requests.cpu", "resources.requests.memory", "resources.limits.cpu", "resources.limits.memory"] {
        assert!(!get(c, path).is_null(), "container {path}");
    }
    let port = |name: &str| -> u64 {
        let ports = get(c, "ports").as_sequence().unwrap();
        let p = ports.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no port named {name}"));
        p["containerPort"].as_u64().unwrap()
    };
    assert_eq!(port("grpc"), u64::from(settings.port));
    assert_eq!(Some(port("admin")), settings.admin.listen.map(|a| u64::from(a.port())));
    // Probes on the admin port, never the mTLS one.
    for (probe, path) in [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(str_at(c, &format!("{probe}.httpGet.path")), path, "{probe}");
        assert_eq!(str_at(c, &format!("{probe}.httpGet.port")), "admin", "{probe}");
    }
    // The drain fits in the grace period, after the preStop pause.
    let grace = get(pod, "terminationGracePeriodSeconds").as_u64().unwrap();
    let pause = get(c, "lifecycle.preStop.sleep.seconds").as_u64().unwrap();
    assert!(settings.drain_timeout.as_secs() + pause < grace, "drain {:?} + preStop {pause}s < grace {grace}s", settings.drain_timeout);

    // Config from the ConfigMap, certificates from the Secret, both read-only,
    // and the config's paths inside their mounts.
    let volumes = get(pod, "volumes").as_sequence().unwrap();
    let mounts = get(c, "volumeMounts").as_sequence().unwrap();
    let mount_of = |volume: &Value| -> &str {
        let name = &volume["name"];
        let m = mounts.iter().find(|m| &m["name"] == name).unwrap_or_else(|| panic!("volume {name:?} is not mounted"));
        assert_eq!(m["readOnly"], Value::Bool(true), "{name:?}");
        m["mountPath"].as_str().unwrap()
    };
    let secret_volume = volumes.iter().find(|v| !v["secret"].is_null()).expect("a Secret volume");
    let secret = one_of_kind(&docs, "Secret");
    assert_eq!(get(secret_volume, "secret.secretName"), get(secret, "metadata.name"));
    let tls_dir = Path::new(mount_of(secret_volume));
    for path in [&settings.tls.cert, &settings.tls.key, &settings.tls.client_ca] {
        assert_eq!(path.parent(), Some(tls_dir), "{}", path.display());
        let key = path.file_name().unwrap().to_str().unwrap();
        assert!(!secret["stringData"][key].is_null(), "the Secret has no {key}");
    }
    let config_volume = volumes.iter().find(|v| !v["configMap"].is_null()).expect("a ConfigMap volume");
    assert_eq!(get(config_volume, "configMap.name"), get(config_map, "metadata.name"));
    let args: Vec<&str> = get(c, "args").as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args, ["--config", &format!("{}/imgsvc.toml", mount_of(config_volume))]);

    // A ClusterIP Service and a headless one, both selecting the pods' gRPC port.
    let services: Vec<&Value> = docs.iter().filter(|(_, d)| d["kind"] == "Service").map(|(_, d)| d).collect();
    assert_eq!(services.len(), 2);
    assert!(services.iter().any(|s| get(s, "spec.clusterIP") == "None"), "a headless Service");
    assert!(services.iter().any(|s| get(s, "spec.type") == "ClusterIP"), "a ClusterIP Service");
    for s in &services {
        assert_eq!(get(s, "spec.selector"), pod_labels);
        assert_eq!(get(s, "spec.ports.0.targetPort"), "grpc");
    }

    // The admin port (no authentication) is reachable only from Prometheus;
    // the gRPC port from anywhere (mutual TLS decides).
    let policy = one_of_kind(&docs, "NetworkPolicy");
    assert_eq!(get(policy, "spec.podSelector.matchLabels"), pod_labels);
    assert_eq!(get(policy, "spec.policyTypes.0"), "Ingress");
    let rules = get(policy, "spec.ingress").as_sequence().unwrap();
    let admin_rules: Vec<&Value> = rules.iter().filter(|r| r["ports"][0]["port"] == "admin").collect();
    assert_eq!(admin_rules.len(), 1, "one rule for the admin port");
    assert!(admin_rules[0]["from"].as_sequence().is_some_and(|f| !f.is_empty()), "the admin port is limited to some sources");
    assert!(rules.iter().all(|r| r["ports"][0]["port"] == "admin" || r["ports"][0]["port"] == "grpc"), "no other port is opened");

    let replicas = get(deployment, "spec.replicas").as_u64().unwrap();
    let pdb = one_of_kind(&docs, "PodDisruptionBudget");
    assert_eq!(get(pdb, "spec.selector.matchLabels"), pod_labels);
    let hpa = one_of_kind(&docs, "HorizontalPodAutoscaler");
    assert_eq!(get(hpa, "spec.scaleTargetRef.kind"), "Deployment");
    assert_eq!(get(hpa, "spec.scaleTargetRef.name"), get(deployment, "metadata.name"));
    let (min, max) = (get(hpa, "spec.minReplicas").as_u64().unwrap(), get(hpa, "spec.maxReplicas").as_u64().unwrap());
    assert!(min <= replicas && replicas <= max);
    // The PDB never blocks a node drain: one pod may always go (a
    // minAvailable as high as the replica count would block it), and so
    // may a pod that is not ready anyway.
    assert!(get(pdb, "spec.minAvailable").is_null(), "minAvailable blocks drains when the HPA sits at minReplicas: use maxUnavailable");
    assert_eq!(get(pdb, "spec.maxUnavailable").as_u64(), Some(1));
    assert!(min > 1, "with maxUnavailable 1, a drain leaves at least one pod serving");
    assert_eq!(get(pdb, "spec.unhealthyPodEvictionPolicy"), "AlwaysAllow");
}

fn autoscaling(file: &str) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(deploy("kubernetes/autoscaling").join(file)).unwrap()).unwrap()
}

#[test]
fn kubernetes_scales_on_queue_and_memory_waits_through_prometheus_adapter_or_keda_and_spreads_over_zones_and_nodes() {
    let docs = manifests();
    let deployment = one_of_kind(&docs, "Deployment");
    let hpa = one_of_kind(&docs, "HorizontalPodAutoscaler");
    let metrics = get(hpa, "spec.metrics").as_sequence().unwrap();
    // Two saturation signals (benches/saturation.sh): queue wait, and memory
    // waits, which a memory-bound pod shows at zero queue wait and low CPU.
    let pods: Vec<&Value> = metrics.iter().filter(|m| m["type"] == "Pods").collect();
    let targets: Vec<(&str, &str, &str)> = pods
        .iter()
        .map(|m| (str_at(m, "pods.metric.name"), str_at(m, "pods.target.type"), str_at(m, "pods.target.averageValue")))
        .collect();
    assert_eq!(
        targets,
        [("imgsvc_queue_wait_seconds_mean", "AverageValue", "10m"), ("imgsvc_memory_waits_per_second", "AverageValue", "1")]
    );
    let name = targets[0].0;

    // prometheus-adapter serves that name from the server's summary.
    let adapter = autoscaling("prometheus-adapter.yaml");
    assert_eq!(adapter["kind"], "ConfigMap");
    let config: Value = serde_yaml::from_str(adapter["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let rule = &config["rules"][0];
    assert_eq!(str_at(rule, "name.as"), name);
    assert!(str_at(rule, "seriesQuery").starts_with("imgsvc_queue_wait_seconds_count{"));
    let memory_rule = &config["rules"][1];
    assert_eq!(str_at(memory_rule, "name.as"), targets[1].0);
    assert!(str_at(memory_rule, "seriesQuery").starts_with("imgsvc_memory_waits_total{"));
    for rule in [rule, memory_rule] {
        for resource in ["namespace", "pod"] {
            assert_eq!(get(rule, &format!("resources.overrides.{resource}.resource")), resource);
        }
        let query = str_at(rule, "metricsQuery");
        assert!(query.contains("<<.LabelMatchers>>") && query.contains("<<.GroupBy>>"), "{query}");
    }

    // KEDA: the same target, bounds, threshold and behaviour.
    let keda = autoscaling("keda-scaledobject.yaml");
    assert_eq!(str_at(&keda, "apiVersion"), "keda.sh/v1alpha1");
    assert_eq!(get(&keda, "spec.scaleTargetRef.name"), get(deployment, "metadata.name"));
    assert_eq!(get(&keda, "spec.minReplicaCount"), get(hpa, "spec.minReplicas"));
    assert_eq!(get(&keda, "spec.maxReplicaCount"), get(hpa, "spec.maxReplicas"));
    assert_eq!(get(&keda, "spec.advanced.horizontalPodAutoscalerConfig.behavior"), get(hpa, "spec.behavior"));
    let trigger = get(&keda, "spec.triggers.0");
    assert_eq!((str_at(trigger, "type"), str_at(trigger, "metricType")), ("prometheus", "Value"));
    assert_eq!(str_at(trigger, "metadata.threshold"), "0.01", "the HPA's 10m");
    assert!(str_at(trigger, "metadata.query").contains("imgsvc_queue_wait_seconds_sum"));
    let trigger = get(&keda, "spec.triggers.1");
    assert_eq!((str_at(trigger, "type"), str_at(trigger, "metricType")), ("prometheus", "Value"));
    assert_eq!(str_at(trigger, "metadata.threshold"), "1", "the HPA's memory waits a second");
    assert!(str_at(trigger, "metadata.query").contains("rate(imgsvc_memory_waits_total"));

    // Spread over zones and nodes, never blocking a scale-out.
    let spread = get(deployment, "spec.template.spec.topologySpreadConstraints").as_sequence().unwrap();
    let keys: Vec<&str> = spread.iter().map(|c| str_at(c, "topologyKey")).collect();
    assert_eq!(keys, ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]);
    for c in spread {
        assert_eq!(str_at(c, "whenUnsatisfiable"), "ScheduleAnyway");
        assert_eq!(get(c, "labelSelector.matchLabels"), get(deployment, "spec.template.metadata.labels"));
    }
}

/// `kubernetes-validate` (PyPI; schemas bundled, works offline), installed
/// with pip when missing. Run as `python3 -m kubernetes_validate`, so it
/// does not depend on where pip puts scripts.
fn kubernetes_validate() -> Option<Command> {
    let tool = || {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "kubernetes_validate"]);
        cmd
    };
    let runs = || tool().arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if runs() {
        return Some(tool());
    }
    match Command::new("python3").args(["-m", "pip", "install", "--quiet", "kubernetes-validate"]).status() {
        Ok(status) if status.success() && runs() => Some(tool()),
        Ok(status) => panic!("pip install kubernetes-validate failed ({status}), or the module does not run after it"),
        Err(e) => {
            eprintln!("SKIPPED: python3 is not available to install kubernetes-validate ({e}); manifests were only parsed");
            None
        }
    }
}

#[test]
fn kubernetes_manifests_pass_schema_validation() {
    let Some(mut tool) = kubernetes_validate() else { return };
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes")).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    // The adapter's ConfigMap too (KEDA's ScaledObject is a CRD the tool has no schema for).
    files.push(deploy("kubernetes/autoscaling/prometheus-adapter.yaml"));
    let out = tool.args(["--strict", "--kubernetes-version", "1.33.0"]).args(&files).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert_eq!(said.matches(" passed for resource ").count(), 9, "{said}");
}

/// The hours of a Go duration such as `2160h`.
fn hours(v: &Value) -> u64 {
    let text = v.as_str().unwrap_or_else(|| panic!("not a duration: {v:?}"));
    text.strip_suffix('h').and_then(|h| h.parse().ok()).unwrap_or_else(|| panic!("{text:?} is not a whole number of hours"))
}

#[test]
fn cert_manager_example_issues_the_mounted_server_secret_and_spiffe_tenant_certificates() {
    let text = std::fs::read_to_string(deploy("kubernetes/cert-manager/certificates.example.yaml")).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect();
    let certificate = |name: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == "Certificate" && get(d, "metadata.name") == name)
            .unwrap_or_else(|| panic!("no Certificate {name}"))
    };
    fn usages(c: &Value) -> Vec<&str> {
        get(c, "spec.usages").as_sequence().unwrap().iter().map(|u| u.as_str().unwrap()).collect()
    }
    let k8s = manifests();
    let settings = {
        let config_map = one_of_kind(&k8s, "ConfigMap");
        let toml = config_map["data"]["imgsvc.toml"].as_str().unwrap();
        Settings::load_with_env(&ConfigSource::Inline { name: "configmap.yaml".into(), toml: toml.into() }, []).unwrap()
    };
    let deployment = one_of_kind(&k8s, "Deployment");
    let volumes = get(deployment, "spec.template.spec.volumes").as_sequence().unwrap();
    let mounted_secret = volumes.iter().find_map(|v| v["secret"]["secretName"].as_str()).unwrap();

    let server = certificate("imgsvc-server");
    assert_eq!(str_at(server, "spec.secretName"), mounted_secret);
    assert_eq!(usages(server), ["digital signature", "server auth"]);
    let tenant = certificate("imgsvc-tenant-team-a");
    assert_eq!(usages(tenant), ["digital signature", "client auth"]);
    let uris = get(tenant, "spec.uris").as_sequence().unwrap();
    let team_a = imgsvc::identity::TenantId::parse("team-a").unwrap();
    assert_eq!(uris, &[Value::from(settings.tls.trust_domain.tenant_uri(&team_a))]);
    // Both signed by the CA issuer, so the ca.crt it writes is the client CA.
    for c in [server, tenant] {
        assert_eq!(str_at(c, "spec.issuerRef.name"), "imgsvc-ca");
        let (duration, renew) = (hours(get(c, "spec.duration")), hours(get(c, "spec.renewBefore")));
        assert!(renew < duration, "renewBefore {renew}h < duration {duration}h");
        assert!(renew > u64::from(settings.tls.expiry_warning_days) * 24, "renewal comes before the expiry warning");
        assert_eq!(str_at(c, "spec.privateKey.rotationPolicy"), "Always");
    }
    assert!(settings.tls.client_ca.ends_with("ca.crt") && settings.tls.watch_files);
}
