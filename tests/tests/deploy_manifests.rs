//! deploy/: the plain Kubernetes manifests and the Helm chart's output are valid objects of
//! the Kubernetes API (kubeconform, strict, against schemas generated from the OpenAPI spec
//! of a Kubernetes release: see `difytrace_tests::kube_tools`), and the DaemonSet carries
//! what the agent needs: hostPID, exactly the capabilities of docs/capabilities.md, the
//! host mounts, and the agent arguments for the values given. A broken manifest must be
//! rejected, so a pass means the schemas were applied.
//!
//! Needs `go` (for the Kubernetes module), kubeconform and helm (`cargo xtask setup
//! --with-test-deps` installs them); no root, no cluster.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use difytrace_tests::kube_tools::{self, Validation, helm_template, kubeconform_validate};
use difytrace_tests::{prerequisite_missing, workspace_root};
use serde_json::Value;

/// The capability set the agent runs with (docs/capabilities.md; tests/capabilities.rs
/// proves it is enough).
const CAPABILITIES: &[&str] = &["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"];

struct Tools {
    kubeconform: PathBuf,
    helm: PathBuf,
}

fn tools(test: &str) -> Option<Tools> {
    let kubeconform = kube_tools::kubeconform();
    let helm = kube_tools::helm();
    let mut missing = Vec::new();
    if kubeconform.is_none() {
        missing.push(
            "kubeconform (`cargo xtask setup --with-test-deps`, or DIFYTRACE_KUBECONFORM)"
                .to_string(),
        );
    }
    if helm.is_none() {
        missing.push("helm (`cargo xtask setup --with-test-deps`, or DIFYTRACE_HELM)".to_string());
    }
    match (kubeconform, helm) {
        (Some(kubeconform), Some(helm)) => Some(Tools { kubeconform, helm }),
        _ => prerequisite_missing(test, &missing),
    }
}

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

fn chart() -> PathBuf {
    deploy_dir().join("helm").join("difytrace")
}

/// Fails unless kubeconform accepted every resource and validated exactly `kinds` (sorted).
fn ensure_valid(v: &Validation, kinds: &[&str]) -> Result<()> {
    ensure!(
        v.success,
        "kubeconform rejected the manifests:\n{}",
        v.output
    );
    let mut valid = v.valid_kinds();
    valid.sort();
    let mut want: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    want.sort();
    ensure!(
        valid == want,
        "kubeconform validated {valid:?}, expected {want:?} (a skipped resource means no schema was applied):\n{}",
        v.output
    );
    Ok(())
}

fn the_daemonset(docs: &[Value]) -> Result<&Value> {
    let ds: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "DaemonSet").collect();
    ensure!(ds.len() == 1, "want one DaemonSet, found {}", ds.len());
    Ok(ds[0])
}

fn agent_container(ds: &Value) -> Result<&Value> {
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("DaemonSet has no containers")?;
    ensure!(
        containers.len() == 1,
        "want one container, found {}",
        containers.len()
    );
    Ok(&containers[0])
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What every variant of the DaemonSet must hold.
fn ensure_agent_shape(ds: &Value) -> Result<()> {
    let pod = &ds["spec"]["template"]["spec"];
    ensure!(pod["hostPID"] == true, "hostPID is not true: {pod}");
    ensure!(
        pod["hostNetwork"].is_null() || pod["hostNetwork"] == false,
        "the agent needs no host network: {pod}"
    );
    let c = agent_container(ds)?;
    let sc = &c["securityContext"];
    ensure!(sc["privileged"] == false, "privileged must be false: {sc}");
    ensure!(sc["runAsUser"] == 0, "the capabilities need uid 0: {sc}");
    ensure!(
        strings(&sc["capabilities"]["drop"]) == ["ALL"],
        "capabilities.drop must be [ALL]: {sc}"
    );
    let mut add = strings(&sc["capabilities"]["add"]);
    add.sort();
    let mut want: Vec<String> = CAPABILITIES.iter().map(|c| c.to_string()).collect();
    want.sort();
    ensure!(add == want, "capabilities.add is {add:?}, want {want:?}");

    let volumes = pod["volumes"].as_array().context("no volumes")?;
    let mounts = c["volumeMounts"].as_array().context("no volumeMounts")?;
    for (host, at) in [
        ("/sys/kernel/tracing", "/sys/kernel/tracing"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
    ] {
        let vol = volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == host)
            .with_context(|| format!("no hostPath volume for {host}: {volumes:?}"))?;
        let mount = mounts
            .iter()
            .find(|m| m["name"] == vol["name"])
            .with_context(|| format!("hostPath {host} is not mounted"))?;
        ensure!(
            mount["mountPath"] == at,
            "{host} mounted at {}",
            mount["mountPath"]
        );
        ensure!(
            mount["readOnly"] == true,
            "{host} must be mounted read-only"
        );
    }
    let node_name = c["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "K8S_NODE_NAME"))
        .context("no K8S_NODE_NAME env")?;
    ensure!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName",
        "K8S_NODE_NAME must come from spec.nodeName: {node_name}"
    );
    Ok(())
}

fn ensure_metrics(ds: &Value, port: u16) -> Result<()> {
    let c = agent_container(ds)?;
    let args = strings(&c["args"]);
    let want = format!("--metrics-addr=0.0.0.0:{port}");
    ensure!(args.contains(&want), "no {want} in {args:?}");
    let ports = c["ports"].as_array().context("no container ports")?;
    ensure!(
        ports
            .iter()
            .any(|p| p["containerPort"] == port && p["name"] == "metrics"),
        "no containerPort {port} named metrics: {ports:?}"
    );
    let ann = &ds["spec"]["template"]["metadata"]["annotations"];
    ensure!(
        ann["prometheus.io/scrape"] == "true",
        "no scrape annotation: {ann}"
    );
    ensure!(
        ann["prometheus.io/port"] == port.to_string().as_str(),
        "scrape port annotation: {ann}"
    );
    Ok(())
}

/// The ClusterRole: pods, read-only, nothing else.
fn ensure_rbac(docs: &[Value]) -> Result<()> {
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .context("no ClusterRole")?;
    let rules = role["rules"].as_array().context("no rules")?;
    ensure!(rules.len() == 1, "want one rule: {rules:?}");
    ensure!(strings(&rules[0]["resources"]) == ["pods"], "{rules:?}");
    ensure!(
        strings(&rules[0]["verbs"]) == ["get", "list", "watch"],
        "{rules:?}"
    );
    Ok(())
}

const ALL_KINDS: &[&str] = &[
    "ClusterRole",
    "ClusterRoleBinding",
    "DaemonSet",
    "Namespace",
    "ServiceAccount",
];
const CHART_KINDS: &[&str] = &[
    "ClusterRole",
    "ClusterRoleBinding",
    "DaemonSet",
    "ServiceAccount",
];

#[test]
fn plain_manifests_are_valid_and_complete() -> Result<()> {
    let Some(t) = tools("plain_manifests_are_valid_and_complete") else {
        return Ok(());
    };
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "no manifests in {}", dir.display());
    let v = kubeconform_validate(&t.kubeconform, &files, None)?;
    ensure_valid(&v, ALL_KINDS)?;

    let mut docs = Vec::new();
    for f in &files {
        docs.extend(kube_tools::yaml_documents(&std::fs::read_to_string(f)?)?);
    }
    let ds = the_daemonset(&docs)?;
    ensure_agent_shape(ds)?;
    ensure_metrics(ds, 9464)?;
    ensure_rbac(&docs)?;
    // the service account the DaemonSet uses is the one the binding names
    let sa = ds["spec"]["template"]["spec"]["serviceAccountName"].clone();
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .context("no ClusterRoleBinding")?;
    ensure!(
        binding["subjects"][0]["name"] == sa,
        "binding subject {} is not the DaemonSet's service account {sa}",
        binding["subjects"][0]
    );
    let args = strings(&agent_container(ds)?["args"]);
    ensure!(
        args.iter().any(|a| a.starts_with("--otlp-endpoint=")),
        "no OTLP endpoint in {args:?}"
    );
    Ok(())
}

#[test]
fn chart_defaults_render_valid_manifests() -> Result<()> {
    let Some(t) = tools("chart_defaults_render_valid_manifests") else {
        return Ok(());
    };
    let yaml = helm_template(&t.helm, &chart(), "dt", "observability", &[], &[])?;
    let v = kubeconform_validate(&t.kubeconform, &[], Some(&yaml))?;
    ensure_valid(&v, CHART_KINDS)?;
    let docs = kube_tools::yaml_documents(&yaml)?;
    let ds = the_daemonset(&docs)?;
    ensure_agent_shape(ds)?;
    ensure_metrics(ds, 9464)?;
    ensure_rbac(&docs)?;
    ensure!(
        ds["metadata"]["namespace"] == "observability",
        "{}",
        ds["metadata"]
    );
    // no endpoint: console output, no filter: the whole node
    let args = strings(&agent_container(ds)?["args"]);
    for flag in [
        "--otlp-endpoint",
        "--k8s-namespace",
        "--k8s-pod-label",
        "--container",
        "--docker-socket",
    ] {
        ensure!(
            !args.iter().any(|a| a.starts_with(flag)),
            "{flag} in the default args {args:?}"
        );
    }
    Ok(())
}

#[test]
fn chart_with_endpoint_and_filters() -> Result<()> {
    let Some(t) = tools("chart_with_endpoint_and_filters") else {
        return Ok(());
    };
    let yaml = helm_template(
        &t.helm,
        &chart(),
        "dt",
        "observability",
        &[
            (
                "otlp.endpoint",
                "http://otel-collector.observability.svc:4318",
            ),
            ("otlp.protocol", "http/protobuf"),
            ("metrics.port", "9100"),
            ("dockerSocket", "/run/docker.sock"),
            ("features.go", "false"),
        ],
        &[
            ("filters.namespaces", r#"["dify","dify-plugins"]"#),
            (
                "filters.podLabels",
                r#"{"app.kubernetes.io/part-of":"dify"}"#,
            ),
            ("filters.containers", r#"["plugin-daemon"]"#),
        ],
    )?;
    let v = kubeconform_validate(&t.kubeconform, &[], Some(&yaml))?;
    ensure_valid(&v, CHART_KINDS)?;
    let docs = kube_tools::yaml_documents(&yaml)?;
    let ds = the_daemonset(&docs)?;
    ensure_agent_shape(ds)?;
    ensure_metrics(ds, 9100)?;
    let c = agent_container(ds)?;
    let args = strings(&c["args"]);
    for want in [
        "--otlp-endpoint=http://otel-collector.observability.svc:4318",
        "--otlp-protocol=http/protobuf",
        "--k8s-namespace=dify",
        "--k8s-namespace=dify-plugins",
        "--k8s-pod-label=app.kubernetes.io/part-of=dify",
        "--container=plugin-daemon",
        "--docker-socket=/run/docker.sock",
        "--no-go",
    ] {
        ensure!(args.iter().any(|a| a == want), "no {want} in {args:?}");
    }
    // the socket is mounted where the flag says
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/run/docker.sock"))
        .context("docker socket not mounted")?;
    let pod = &ds["spec"]["template"]["spec"];
    let vol = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
        .context("no volume for the docker socket mount")?;
    ensure!(vol["hostPath"]["path"] == "/run/docker.sock", "{vol}");
    Ok(())
}

#[test]
fn chart_without_metrics_rbac_or_native_uprobes() -> Result<()> {
    let Some(t) = tools("chart_without_metrics_rbac_or_native_uprobes") else {
        return Ok(());
    };
    let yaml = helm_template(
        &t.helm,
        &chart(),
        "dt",
        "observability",
        &[
            ("metrics.enabled", "false"),
            ("rbac.create", "false"),
            ("serviceAccount.create", "false"),
            ("serviceAccount.name", "agent"),
            ("features.greenlets", "false"),
            ("features.nginx", "false"),
        ],
        &[],
    )?;
    let v = kubeconform_validate(&t.kubeconform, &[], Some(&yaml))?;
    ensure_valid(&v, &["DaemonSet"])?;
    let docs = kube_tools::yaml_documents(&yaml)?;
    let ds = the_daemonset(&docs)?;
    ensure_agent_shape(ds)?;
    let c = agent_container(ds)?;
    let args = strings(&c["args"]);
    for want in ["--no-greenlets", "--no-nginx"] {
        ensure!(args.iter().any(|a| a == want), "no {want} in {args:?}");
    }
    ensure!(
        c["ports"].is_null(),
        "ports without metrics: {}",
        c["ports"]
    );
    ensure!(
        !strings(&c["args"])
            .iter()
            .any(|a| a.starts_with("--metrics-addr")),
        "{}",
        c["args"]
    );
    ensure!(
        ds["spec"]["template"]["spec"]["serviceAccountName"] == "agent",
        "{}",
        ds["spec"]["template"]["spec"]
    );
    Ok(())
}

/// The schemas are really applied: an unknown field, a wrong type and a missing required
/// field are each rejected (with the offending path in the message), while the same
/// DaemonSet without the fault passes.
#[test]
fn broken_manifests_are_rejected() -> Result<()> {
    let Some(t) = tools("broken_manifests_are_rejected") else {
        return Ok(());
    };
    let good = std::fs::read_to_string(deploy_dir().join("kubernetes").join("daemonset.yaml"))?;
    let v = kubeconform_validate(&t.kubeconform, &[], Some(&good))?;
    ensure_valid(&v, &["DaemonSet"])?;

    let faults = [
        // a misspelt field (hostPid): only strict schemas catch it
        ("hostPID: true", "hostPid: true", "hostPid"),
        // a port as a string
        (
            "containerPort: 9464",
            "containerPort: \"9464\"",
            "containerPort",
        ),
        // a container without its required name
        ("- name: agent\n", "- image2: x\n", "name"),
    ];
    for (from, to, what) in faults {
        ensure!(good.contains(from), "daemonset.yaml has no {from:?}");
        let broken = good.replacen(from, to, 1);
        let v = kubeconform_validate(&t.kubeconform, &[], Some(&broken))?;
        ensure!(
            !v.success,
            "kubeconform accepted a DaemonSet with {to:?} instead of {from:?}:\n{}",
            v.output
        );
        ensure!(
            v.resources
                .iter()
                .any(|r| r.2 == "statusInvalid" && r.3.contains(what)),
            "the rejection of {to:?} does not name {what}:\n{}",
            v.output
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// deploy/Dockerfile. No registry is reachable here, so the builder stage cannot run; what
// can be checked without one is. tests/agent_image.rs builds and runs the runtime stage from
// a prebuilt binary.

/// A Dockerfile instruction: keyword and its text (continuation lines joined).
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(cont) = trimmed.strip_suffix('\\') {
            current.push_str(cont);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        // one space between words, wherever the lines were broken
        let joined = current.split_whitespace().collect::<Vec<_>>().join(" ");
        let (keyword, rest) = joined.split_once(' ').unwrap_or((joined.as_str(), ""));
        out.push((keyword.to_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

/// Value of `ARG name=value` before the first stage.
fn dockerfile_arg(ins: &[(String, String)], name: &str) -> Option<String> {
    ins.iter()
        .take_while(|(k, _)| k != "FROM")
        .filter(|(k, _)| k == "ARG")
        .find_map(|(_, v)| v.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// The stages: builder reproduces `cargo xtask setup`'s toolchain (same pins as xtask),
/// prebuilt takes the tree from the build context instead, rootfs is the one ARG ROOTFS
/// names (builder by default), and the runtime stage is scratch with only that tree, run as
/// uid 0.
#[test]
fn dockerfile_stages_and_toolchain() -> Result<()> {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile"))?;
    let ins = dockerfile_instructions(&text);
    let froms: Vec<&String> = ins
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    ensure!(
        froms.len() == 4,
        "want builder, prebuilt, rootfs and runtime stages: {froms:?}"
    );
    ensure!(
        froms[0].starts_with("rust:${RUST_VERSION}") && froms[0].ends_with("AS builder"),
        "{}",
        froms[0]
    );
    ensure!(froms[1] == "scratch AS prebuilt", "{}", froms[1]);
    ensure!(froms[2] == "${ROOTFS} AS rootfs", "{}", froms[2]);
    ensure!(froms[3] == "scratch AS runtime", "{}", froms[3]);
    ensure!(
        dockerfile_arg(&ins, "ROOTFS").as_deref() == Some("builder"),
        "the default build should compile: ARG ROOTFS=builder"
    );
    let prebuilt: Vec<&(String, String)> = ins
        .iter()
        .skip_while(|(k, v)| !(k == "FROM" && v.ends_with("AS prebuilt")))
        .skip(1)
        .take_while(|(k, _)| k != "FROM")
        .collect();
    ensure!(
        prebuilt.len() == 1 && prebuilt[0].0 == "COPY" && prebuilt[0].1 == ". /out/rootfs/",
        "the prebuilt stage should only take the context as the tree: {prebuilt:?}"
    );

    // the pins are xtask's
    let util = std::fs::read_to_string(workspace_root().join("xtask/src/util.rs"))?;
    let setup = std::fs::read_to_string(workspace_root().join("xtask/src/setup.rs"))?;
    for (arg, source, constant) in [
        ("RUST_VERSION", &util, "USER_TOOLCHAIN"),
        ("EBPF_TOOLCHAIN", &util, "EBPF_TOOLCHAIN"),
        ("BPF_LINKER_VERSION", &setup, "BPF_LINKER_VERSION"),
    ] {
        let value = dockerfile_arg(&ins, arg).with_context(|| format!("no ARG {arg}"))?;
        let decl = format!("const {constant}: &str = \"{value}\";");
        ensure!(
            source.contains(&decl),
            "ARG {arg}={value} differs from xtask's {constant}"
        );
    }
    let builder: Vec<&(String, String)> = ins
        .iter()
        .skip_while(|(k, v)| !(k == "FROM" && v.ends_with("AS builder")))
        .skip(1)
        .take_while(|(k, _)| k != "FROM")
        .collect();
    let runs: String = builder
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for want in [
        "llvm-22-dev",
        "libpolly-22-dev",
        "rustup toolchain install ${EBPF_TOOLCHAIN} --profile minimal --component rust-src",
        "cargo install bpf-linker --locked --version ${BPF_LINKER_VERSION} --no-default-features --features llvm-22",
        "cargo +${RUST_VERSION} build --locked --release -p tracer",
        "sh deploy/runtime-rootfs.sh target/release/tracer /out/rootfs",
    ] {
        ensure!(
            runs.contains(want),
            "the builder does not run {want:?}:\n{runs}"
        );
    }
    ensure!(
        builder
            .iter()
            .any(|(k, v)| k == "ENV" && v.contains("LLVM_PREFIX=/usr/lib/llvm-22")),
        "no LLVM_PREFIX in the builder"
    );

    let runtime: Vec<&(String, String)> = ins
        .iter()
        .skip_while(|(k, v)| !(k == "FROM" && v.ends_with("AS runtime")))
        .skip(1)
        .collect();
    let kinds: Vec<&str> = runtime.iter().map(|(k, _)| k.as_str()).collect();
    ensure!(
        kinds == ["COPY", "USER", "ENTRYPOINT"],
        "the runtime stage should only copy the tree, set the user and the entrypoint: {runtime:?}"
    );
    ensure!(
        runtime[0].1 == "--from=rootfs /out/rootfs/ /",
        "{}",
        runtime[0].1
    );
    ensure!(runtime[1].1 == "0:0", "{}", runtime[1].1);
    ensure!(
        runtime[2].1 == r#"["/usr/local/bin/tracer"]"#,
        "{}",
        runtime[2].1
    );
    // the build context file excludes target/ (tens of GB here)
    let ignore = std::fs::read_to_string(deploy_dir().join("Dockerfile.dockerignore"))?;
    ensure!(ignore.lines().any(|l| l.trim() == "target"), "{ignore}");
    Ok(())
}

/// The runtime tree from the real agent binary: exactly the binary and the libraries ldd
/// names, and the agent runs from it alone (chroot, so nothing of the host is visible).
#[test]
fn runtime_tree_runs_the_agent() -> Result<()> {
    let Some(_e2e) = difytrace_tests::e2e("runtime_tree_runs_the_agent") else {
        return Ok(());
    };
    let bin = difytrace_tests::agent::agent_binary();
    let tmp = difytrace_tests::TempDir::new("rootfs")?;
    let root = tmp.join("rootfs");
    let out = std::process::Command::new("sh")
        .arg(deploy_dir().join("runtime-rootfs.sh"))
        .arg(&bin)
        .arg(&root)
        .output()?;
    ensure!(
        out.status.success(),
        "runtime-rootfs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p.strip_prefix(&root)?.display().to_string());
            }
        }
    }
    files.sort();
    // what ldd lists, other than the kernel's vDSO
    let ldd = std::process::Command::new("ldd").arg(&bin).output()?;
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let mut want: Vec<String> = ldd
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            match fields.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some(path.to_string()),
                [path, ..] if path.starts_with('/') => Some(path.to_string()),
                _ => None,
            }
        })
        .map(|p| p.trim_start_matches('/').to_string())
        .collect();
    want.push("usr/local/bin/tracer".to_string());
    want.sort();
    ensure!(files == want, "runtime tree {files:?}, want {want:?}");
    let run = std::process::Command::new("chroot")
        .arg(&root)
        .args(["/usr/local/bin/tracer", "--version"])
        .output()?;
    ensure!(
        run.status.success() && String::from_utf8_lossy(&run.stdout).starts_with("tracer "),
        "the agent does not run from its runtime tree alone: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    Ok(())
}

#[test]
fn chart_with_kubelet_and_cri_sockets() -> Result<()> {
    let Some(t) = tools("chart_with_kubelet_and_cri_sockets") else {
        return Ok(());
    };
    let yaml = helm_template(
        &t.helm,
        &chart(),
        "dt",
        "observability",
        &[("kubelet.enabled", "true"), ("kubelet.insecureTLS", "true")],
        &[("criSockets", r#"["/run/k3s/containerd/containerd.sock"]"#)],
    )?;
    let v = kubeconform_validate(&t.kubeconform, &[], Some(&yaml))?;
    ensure_valid(&v, CHART_KINDS)?;
    let docs = kube_tools::yaml_documents(&yaml)?;
    let ds = the_daemonset(&docs)?;
    ensure_agent_shape(ds)?;
    let c = agent_container(ds)?;
    let args = strings(&c["args"]);
    ensure!(
        args.iter()
            .any(|a| a == "--cri-socket=/run/k3s/containerd/containerd.sock"),
        "no --cri-socket in {args:?}"
    );
    let env = c["env"].as_array().context("no env")?;
    let var = |name: &str| env.iter().find(|e| e["name"] == name);
    let node_ip = var("NODE_IP").context("no NODE_IP")?;
    ensure!(
        node_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP",
        "{node_ip}"
    );
    // Kubernetes expands $(NODE_IP) from the variable defined before it.
    ensure!(
        var("KUBELET_URL").map(|e| e["value"].clone())
            == Some(Value::from("https://$(NODE_IP):10250")),
        "{env:?}"
    );
    ensure!(
        var("KUBELET_INSECURE_TLS").map(|e| e["value"].clone()) == Some(Value::from("true")),
        "{env:?}"
    );
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .context("no ClusterRole")?;
    let rules = role["rules"].as_array().context("no rules")?;
    ensure!(
        rules.iter().any(|r| strings(&r["resources"]) == ["nodes/proxy"]
            && strings(&r["verbs"]) == ["get"]),
        "no nodes/proxy get for the kubelet: {rules:?}"
    );
    Ok(())
}
