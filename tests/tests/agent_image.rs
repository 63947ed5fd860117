//! The agent image, built and run the way the DaemonSet runs it. No registry is reachable
//! here, so deploy/Dockerfile's runtime stage is built from the agent binary under test
//! (`--build-arg ROOTFS=prebuilt`, the build context being the tree deploy/runtime-rootfs.sh
//! makes) by a private dockerd with BuildKit; the image must hold that tree and nothing
//! else, in one layer.
//!
//! The image then runs with what deploy/kubernetes/daemonset.yaml gives the agent, read from
//! the manifest itself: exactly its capabilities (no privileged mode), the host's pid
//! namespace, a read-only root, no privilege escalation, its memory limit, its host mounts
//! read-only, its environment, the image's entrypoint with the manifest's arguments. Docker
//! 20.10 (Debian 12's docker.io) rejects CAP_BPF and CAP_PERFMON as unknown capabilities, so
//! the image's layer runs under runc with the OCI spec a kubelet and containerd would hand
//! runc for that pod (what `runc spec` makes, with the manifest's settings applied; no pid
//! namespace for hostPID, as the CRI does). With `--comm gunicorn` the agent traces a
//! gunicorn on the host and one in a docker container, exports to the test's OTLP receiver,
//! and stops cleanly on SIGTERM (what a pod deletion sends). Run again with `--cgroup`, its
//! container watcher sees a cgroup made after its start through the read-only cgroup mount
//! (inotify) and traces the first request of a server in it.
//!
//! One deviation from the manifest: the host's network namespace, because the receiver
//! listens on the host's loopback (the DaemonSet exports to a collector Service and needs no
//! host network).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use difytrace_tests::{
    agentstats::selected_age_ms,
    cgroups::{OwnCgroup, cgroup2_root},
    docker::{Dockerd, IMAGE_PYTHONPATH, Unavailable},
    otlp_receiver::{OtlpReceiver, ReceivedSpan},
    procs::{Proc, free_port, http_get, local},
    python::{DEMO_APP, Gunicorn, GunicornOpts, check_flask_gunicorn},
    workspace_root,
};
use serde_yaml::Value;

/// A `gunicorn` launcher inside the test image: the kernel names the process after the
/// script, so `--comm gunicorn` selects it as it selects the host's gunicorn.
const GUNICORN_SCRIPT: &str = "#!/usr/bin/python3\n\
import sys\n\
sys.path.insert(0, \"/opt/difytrace-py\")\n\
from gunicorn.app.wsgiapp import run\n\
sys.exit(run())\n";

/// The app the containerized gunicorn serves.
const CONTAINER_APP: &str = r#"
import os
from flask import Flask
app = Flask(__name__)

@app.route("/<path:p>")
def any_path(p):
    return "ok %s\n" % p, 200, {"X-Worker-Pid": str(os.getpid())}
"#;

fn dockerd_or_skip(test: &str) -> Option<Dockerd> {
    match Dockerd::start() {
        Ok(d) => Some(d),
        Err(Unavailable(why)) => {
            difytrace_tests::prerequisite_missing(test, &[format!("a working dockerd ({why})")])
        }
    }
}

/// The agent container of deploy/kubernetes/daemonset.yaml and the pod spec around it.
struct Manifest {
    pod: Value,
    agent: Value,
}

fn manifest() -> Result<Manifest> {
    let path = workspace_root().join("deploy/kubernetes/daemonset.yaml");
    let text = std::fs::read_to_string(&path)?;
    let ds: Value = serde_yaml::from_str(&text).context("daemonset.yaml")?;
    let pod = ds["spec"]["template"]["spec"].clone();
    let agent = pod["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some("agent")))
        .context("no container named agent in daemonset.yaml")?
        .clone();
    Ok(Manifest { pod, agent })
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Kubernetes memory quantities of the forms the manifest uses (Mi, Gi), in bytes.
fn memory_bytes(quantity: &str) -> Result<u64> {
    if let Some(mi) = quantity.strip_suffix("Mi") {
        return Ok(mi.parse::<u64>()? << 20);
    }
    if let Some(gi) = quantity.strip_suffix("Gi") {
        return Ok(gi.parse::<u64>()? << 30);
    }
    bail!("memory quantity {quantity:?}: only Mi and Gi are mapped")
}

/// Applies to `runc spec`'s default OCI config what the manifest gives the agent container.
/// Fails on anything in the manifest this mapping does not know, so a manifest change cannot
/// slip past the test.
fn apply_manifest(
    spec: &mut serde_json::Value,
    m: &Manifest,
    args: Vec<String>,
    node_name: &str,
    cgroup: &str,
) -> Result<()> {
    use serde_json::json;
    ensure!(
        m.pod["hostPID"].as_bool() == Some(true),
        "the DaemonSet should set hostPID"
    );
    ensure!(
        m.pod["hostNetwork"].is_null(),
        "hostNetwork appeared in the manifest: the test's host network is no longer a deviation"
    );
    // hostPID: no pid namespace of its own. The network namespace: the test's deviation.
    let namespaces = spec["linux"]["namespaces"]
        .as_array_mut()
        .context("linux.namespaces")?;
    namespaces.retain(|n| !matches!(n["type"].as_str(), Some("pid") | Some("network")));
    let sc = &m.agent["securityContext"];
    ensure!(sc["privileged"].as_bool() == Some(false), "privileged");
    spec["process"]["noNewPrivileges"] =
        json!(sc["allowPrivilegeEscalation"].as_bool() == Some(false));
    spec["root"]["readonly"] = json!(sc["readOnlyRootFilesystem"].as_bool() == Some(true));
    let uid = sc["runAsUser"].as_u64().context("runAsUser")?;
    let gid = sc["runAsGroup"].as_u64().context("runAsGroup")?;
    spec["process"]["user"] = json!({"uid": uid, "gid": gid});
    // drop ALL, then add: the added ones are the whole set (the CRI leaves inheritable and
    // ambient empty).
    let drop = strs(&sc["capabilities"]["drop"]);
    ensure!(drop == ["ALL"], "capabilities.drop {drop:?}");
    let caps: Vec<String> = strs(&sc["capabilities"]["add"])
        .into_iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    spec["process"]["capabilities"] =
        json!({"bounding": caps, "effective": caps, "permitted": caps});
    if let Some(limit) = m.agent["resources"]["limits"]["memory"].as_str() {
        spec["linux"]["resources"]["memory"] = json!({"limit": memory_bytes(limit)?});
    }
    spec["linux"]["cgroupsPath"] = json!(cgroup);
    let volumes = m.pod["volumes"].as_sequence().context("volumes")?;
    let mut mounts = Vec::new();
    for mount in m.agent["volumeMounts"]
        .as_sequence()
        .context("volumeMounts")?
    {
        let name = mount["name"].as_str().context("volumeMount name")?;
        let at = mount["mountPath"].as_str().context("mountPath")?;
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .with_context(|| format!("no volume {name}"))?;
        let host = volume["hostPath"]["path"]
            .as_str()
            .with_context(|| format!("volume {name} is no hostPath"))?;
        let mut options = vec!["rbind"];
        if mount["readOnly"].as_bool() == Some(true) {
            options.push("ro");
        }
        mounts.push(json!({"destination": at, "type": "bind", "source": host, "options": options}));
    }
    spec["mounts"]
        .as_array_mut()
        .context("mounts")?
        .extend(mounts);
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    for e in m.agent["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().context("env name")?;
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => v.to_string(),
            (None, Some("spec.nodeName")) => node_name.to_string(),
            other => bail!("env {name}: {other:?} is not mapped"),
        };
        env.push(format!("{name}={value}"));
    }
    spec["process"]["env"] = json!(env);
    spec["process"]["args"] = json!(args);
    spec["process"]["terminal"] = json!(false);
    Ok(())
}

/// The manifest's agent arguments with the endpoint and metrics port of this test, plus
/// `extra` (filters).
fn agent_args(m: &Manifest, endpoint: &str, metrics_port: u16, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = strs(&m.agent["args"])
        .into_iter()
        .map(|a| {
            if a.starts_with("--otlp-endpoint=") {
                format!("--otlp-endpoint={endpoint}")
            } else if a.starts_with("--metrics-addr=") {
                format!("--metrics-addr=127.0.0.1:{metrics_port}")
            } else {
                a
            }
        })
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The files of a directory tree, relative, sorted.
fn files_below(root: &Path) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                let rel = entry.path().strip_prefix(root)?.display().to_string();
                out.push((rel, meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The files (not directories) of the image's layers, from `docker save`, and the number of
/// layers; the layers are unpacked into `rootfs`.
fn image_layer_files(
    dk: &Dockerd,
    tag: &str,
    dir: &Path,
    rootfs: &Path,
) -> Result<(Vec<String>, usize)> {
    let saved = dir.join("image.tar");
    let saved_s = saved.to_string_lossy().into_owned();
    dk.docker(&["save", "-o", &saved_s, tag])?;
    let unpacked = dir.join("image");
    std::fs::create_dir_all(&unpacked)?;
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&saved)
        .arg("-C")
        .arg(&unpacked)
        .status()?;
    ensure!(st.success(), "untar of docker save: {st}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unpacked.join("manifest.json"))?)?;
    let layers: Vec<String> = manifest[0]["Layers"]
        .as_array()
        .context("Layers in docker save's manifest.json")?
        .iter()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect();
    let mut files = Vec::new();
    for layer in &layers {
        let out = Command::new("tar")
            .arg("-tvf")
            .arg(unpacked.join(layer))
            .output()?;
        ensure!(out.status.success(), "tar -tvf {layer}");
        std::fs::create_dir_all(rootfs)?;
        let st = Command::new("tar")
            .arg("-xf")
            .arg(unpacked.join(layer))
            .arg("-C")
            .arg(rootfs)
            .status()?;
        ensure!(st.success(), "untar of layer {layer}: {st}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "-rwxr-xr-x 0/0 123 2026-01-01 00:00 usr/local/bin/tracer": files only
            if line.starts_with('-') {
                let path = line.split_whitespace().last().unwrap_or_default();
                files.push(path.trim_start_matches("./").to_string());
            }
        }
    }
    files.sort();
    Ok((files, layers.len()))
}

/// The agent under runc (`runc run` in the foreground: it forwards signals to the container
/// and exits with its status); deleted on drop.
struct RuncAgent {
    proc: Proc,
    root: PathBuf,
    id: String,
}

impl RuncAgent {
    /// Writes the bundle's config.json for the manifest and `args`, runs it as container `id`
    /// in `cgroup`, and waits until the agent says it traces.
    fn start(
        work: &Path,
        bundle: &Path,
        m: &Manifest,
        args: Vec<String>,
        id: &str,
        cgroup: &str,
    ) -> Result<RuncAgent> {
        let config_path = bundle.join("config.json");
        // runc spec does not overwrite.
        let _ = std::fs::remove_file(&config_path);
        let out = Command::new("runc")
            .arg("spec")
            .arg("--bundle")
            .arg(bundle)
            .output()
            .context("running runc spec (Debian package runc, a docker.io dependency)")?;
        ensure!(
            out.status.success(),
            "runc spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
        apply_manifest(&mut spec, m, args, "node-1", cgroup)?;
        std::fs::write(&config_path, serde_json::to_vec_pretty(&spec)?)?;
        let root = work.join("runc");
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(&root)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id);
        let proc = Proc::spawn(&format!("runc-{id}"), cmd, work)?;
        let mut agent = RuncAgent {
            proc,
            root,
            id: id.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = |log: &str| {
            log.contains("tracing every process") || log.contains("tracing the selected processes")
        };
        while !ready(&agent.log()) {
            ensure!(
                agent.proc.is_running() && Instant::now() < deadline,
                "the agent container did not get ready ({:?}):\n{}",
                agent.proc.try_exit(),
                log_tail(&agent.log(), 60)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(agent)
    }

    fn runc(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .output()
            .with_context(|| format!("running runc {args:?}"))?;
        ensure!(
            out.status.success(),
            "runc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The host pid of the container's process.
    fn pid(&self) -> Result<u32> {
        let state: serde_json::Value = serde_json::from_str(&self.runc(&["state", &self.id])?)?;
        state["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .context("pid in runc state")
    }

    fn log(&self) -> String {
        format!("{}{}", self.proc.stdout(), self.proc.stderr())
    }
}

impl Drop for RuncAgent {
    fn drop(&mut self) {
        let _ = self.runc(&["kill", &self.id, "KILL"]);
        self.proc.print_logs_on_drop = std::thread::panicking();
        self.proc.stop();
        let _ = self.runc(&["delete", "--force", &self.id]);
    }
}

/// A host pid's pid in its own (innermost) pid namespace.
fn ns_pid(pid: u32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .context("NSpid")?
        .parse()
        .context("NSpid value")
}

fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn agent_image_builds_without_a_registry_and_traces_as_the_daemonset() -> Result<()> {
    let test = "agent_image_builds_without_a_registry_and_traces_as_the_daemonset";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    check_flask_gunicorn()?;
    let Some(mut dk) = dockerd_or_skip(test) else {
        return Ok(());
    };
    let tag = random_hex(8);
    let work = difytrace_tests::TempDir::new("agent-image")?;

    // The runtime tree of the binary under test, and the image from it.
    let rootfs = work.join("rootfs");
    let bin = difytrace_tests::agent::agent_binary();
    let out = Command::new("sh")
        .arg(workspace_root().join("deploy/runtime-rootfs.sh"))
        .arg(&bin)
        .arg(&rootfs)
        .output()?;
    ensure!(
        out.status.success(),
        "runtime-rootfs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = format!("difytrace/agent:test-{tag}");
    let built_at = Instant::now();
    let build_log = dk.build(
        &workspace_root().join("deploy/Dockerfile"),
        &rootfs,
        &[("ROOTFS", "prebuilt")],
        &image,
    )?;
    let build_time = built_at.elapsed();
    // BuildKit names each step by its stage: the builder stage must not have run at all.
    ensure!(
        !build_log.contains("[builder"),
        "the builder stage ran:\n{}",
        log_tail(&build_log, 40)
    );

    // Only the binary and its libraries, in one layer, as big as they are.
    let tree = files_below(&rootfs)?;
    let tree_bytes: u64 = tree.iter().map(|(_, len)| len).sum();
    let want: Vec<String> = tree.iter().map(|(p, _)| p.clone()).collect();
    let bundle = work.join("bundle");
    let (files, layers) = image_layer_files(&dk, &image, work.path(), &bundle.join("rootfs"))?;
    ensure!(layers == 1, "{layers} layers, want one");
    ensure!(files == want, "image files {files:?}, want {want:?}");
    let size: u64 = dk
        .docker(&["image", "inspect", "--format", "{{.Size}}", &image])?
        .parse()
        .context("image size")?;
    ensure!(
        size >= tree_bytes && size <= tree_bytes + 64 * 1024,
        "image size {size} bytes for a tree of {tree_bytes} bytes"
    );
    let entrypoint = dk.docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}}",
        &image,
    ])?;
    let entrypoint: Vec<String> = serde_json::from_str(&entrypoint).context("entrypoint")?;
    ensure!(
        entrypoint == ["/usr/local/bin/tracer"],
        "entrypoint {entrypoint:?}"
    );
    let user = dk.docker(&["image", "inspect", "--format", "{{.Config.User}}", &image])?;
    ensure!(user == "0:0", "image user {user}");
    eprintln!(
        "{test}: image {size} bytes ({:.1} MiB) in {layers} layer: {} files, built in {} ms",
        size as f64 / (1024.0 * 1024.0),
        files.len(),
        build_time.as_millis()
    );

    // A gunicorn in another container, named gunicorn like the host's.
    let launcher = work.join("gunicorn");
    std::fs::write(&launcher, GUNICORN_SCRIPT)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755))?;
    }
    let app_image = format!("difytrace-test-app:{tag}");
    dk.build_python_image(
        &app_image,
        CONTAINER_APP,
        &[(launcher.as_path(), "/usr/local/bin/gunicorn")],
    )?;
    let app_port = free_port();
    let app_bind = format!("127.0.0.1:{app_port}");
    let app_name = format!("dt-app-{tag}");
    let pythonpath = format!("PYTHONPATH={IMAGE_PYTHONPATH}");
    let app_id = dk.run(
        &app_name,
        &[
            "-e",
            &pythonpath,
            "-w",
            "/opt/app",
            &app_image,
            "/usr/local/bin/gunicorn",
            "-w",
            "1",
            "-b",
            &app_bind,
            "app:app",
        ],
    )?;
    let host = Gunicorn::start(DEMO_APP, &GunicornOpts::default())?;
    difytrace_tests::procs::wait_port(local(app_port), Duration::from_secs(60))
        .with_context(|| format!("app container not serving:\n{}", dk.logs(&app_name)))?;

    // The agent container, as the DaemonSet runs it.
    let m = manifest()?;
    let rx = OtlpReceiver::start()?;
    let metrics_port = free_port();
    let mut args = entrypoint;
    args.extend(agent_args(
        &m,
        &rx.grpc_endpoint(),
        metrics_port,
        &["--comm", "gunicorn"],
    ));
    let agent_cgroup = format!("/difytrace-agent-{tag}");
    let agent = RuncAgent::start(
        work.path(),
        &bundle,
        &m,
        args,
        &format!("difytrace-agent-{tag}"),
        &agent_cgroup,
    )?;
    // Exactly the manifest's capabilities, effective for uid 0.
    let mut agent = agent;
    let agent_pid = agent.pid()?;
    let status = std::fs::read_to_string(format!("/proc/{agent_pid}/status"))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .context("CapEff")?;
    // CAP_DAC_READ_SEARCH 2, CAP_SYS_PTRACE 19, CAP_PERFMON 38, CAP_BPF 39
    let want_caps: u64 = (1 << 2) | (1 << 19) | (1 << 38) | (1 << 39);
    ensure!(
        u64::from_str_radix(cap_eff, 16)? == want_caps,
        "the agent's effective capabilities are {cap_eff}, want {want_caps:016x}"
    );
    let own_cgroup = std::fs::read_to_string(format!("/proc/{agent_pid}/cgroup"))?;
    ensure!(
        own_cgroup.contains(&agent_cgroup),
        "the agent is not in its container's cgroup {agent_cgroup}:\n{own_cgroup}"
    );

    let mut sent = vec![
        get(host.addr(), "/hello", &[])?,
        get(host.addr(), &format!("/users/{tag}"), &[])?,
        get(host.addr(), "/fail", &[])?,
    ];
    let in_container = format!("/in-container-{tag}");
    let r = http_get(local(app_port), &in_container, &[])?;
    ensure!(r.status == 200, "{r:?}");
    sent.push(Sent::from_response("GET", &in_container, app_port, &r)?);
    let spans = rx
        .wait_for(|s| all_served(s, &sent), SPAN_WAIT)
        .map_err(|e| e.context(format!("agent log:\n{}", log_tail(&agent.log(), 60))))?;
    // Method, path, status, service.name, host pid of the worker, host.name,
    // process.executable.name (common::check_server_span).
    check_server_spans(&spans, &sent[..3], "app", host.port())?;
    for r in &sent[..3] {
        let span: &ReceivedSpan = servers_for(&spans, r)[0];
        ensure!(
            span.res_str("container.id").is_none(),
            "the host's gunicorn got a container.id: {:?}",
            span.res_str("container.id")
        );
    }
    let app_span = servers_for(&spans, &sent[3])[0];
    ensure!(
        app_span.res_str("container.id").as_deref() == Some(app_id.as_str()),
        "the containerized gunicorn's span has container.id {:?}, want {app_id}",
        app_span.res_str("container.id")
    );
    // process.pid is the host's pid of the worker that answered (X-Worker-Pid is its pid
    // inside the container).
    let host_pid = app_span.pid().context("process.pid")?;
    ensure!(
        ns_pid(host_pid)? == sent[3].worker_pid,
        "process.pid {host_pid} is not the container's worker {} ({})",
        sent[3].worker_pid,
        app_span.summary()
    );
    ensure!(
        app_span.attr_int("http.response.status_code") == Some(200)
            && app_span.attr_str("http.request.method").as_deref() == Some("GET"),
        "{}",
        app_span.summary()
    );

    // A pod deletion sends SIGTERM: the agent flushes and exits 0 within the grace period.
    let grace = Duration::from_secs(
        m.pod["terminationGracePeriodSeconds"]
            .as_u64()
            .context("terminationGracePeriodSeconds")?,
    );
    let stopping = Instant::now();
    agent.proc.signal(libc::SIGTERM)?;
    let exit = agent.proc.wait_exit(grace);
    let stop_time = stopping.elapsed();
    let log = agent.log();
    ensure!(
        exit.is_some_and(|st| st.success()),
        "the agent did not exit 0 on SIGTERM within {grace:?} ({exit:?}):\n{}",
        log_tail(&log, 40)
    );
    for bad in [" ERROR ", "Operation not permitted", "EPERM"] {
        ensure!(
            !log.contains(bad),
            "the agent logged {bad:?}:\n{}",
            log_tail(&log, 60)
        );
    }
    for line in log.lines().filter(|l| l.contains(" WARN ")) {
        eprintln!("{test}: agent warning: {line}");
    }
    eprintln!(
        "{test}: {} spans; the agent stopped in {} ms",
        spans.len(),
        stop_time.as_millis()
    );
    drop(agent);
    drop(host);

    // With a selection, the watcher runs in the container too: a cgroup made after the agent
    // is seen through the read-only cgroup mount (inotify) and enters the kernel filter at
    // once, with no more than the four capabilities.
    let cg_root = cgroup2_root().context("no cgroup2 mount")?;
    let parent_name = format!("difytrace-img-{tag}");
    let parent = OwnCgroup::create(&cg_root, &parent_name)?;
    let rx = OtlpReceiver::start()?;
    let mut args = vec!["/usr/local/bin/tracer".to_string()];
    let selection = format!("--cgroup=/{parent_name}");
    args.extend(agent_args(
        &m,
        &rx.grpc_endpoint(),
        free_port(),
        &[
            &selection,
            "--log-level=info,tracer::agent=debug,tracer::discover::containers=debug",
        ],
    ));
    let agent = RuncAgent::start(
        work.path(),
        &bundle,
        &m,
        args,
        &format!("difytrace-agent2-{tag}"),
        &format!("/difytrace-agent2-{tag}"),
    )?;
    let child = OwnCgroup::create(&parent.dir, "job")?;
    let port = free_port();
    let serve = format!(
        "echo $$ > {}/cgroup.procs && exec {} -m http.server --bind 127.0.0.1 {port}",
        child.dir.display(),
        difytrace_tests::python::python().display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(serve).current_dir(work.path());
    let mut server = Proc::spawn("late-server", cmd, work.path())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(local(port)).is_err() {
        ensure!(
            server.is_running() && Instant::now() < deadline,
            "server not serving\n{}",
            server.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let path = format!("/late-{tag}/0");
    http_get(local(port), &path, &[])?;
    rx.wait_for(
        |s| {
            s.iter()
                .any(|x| x.is_server() && x.attr_str("url.path").as_deref() == Some(&path))
        },
        SPAN_WAIT,
    )
    .map_err(|e| {
        e.context(format!(
            "first request in a cgroup made after the agent container not traced:\n{}",
            log_tail(&agent.log(), 60)
        ))
    })?;
    let log = agent.log();
    let child_path = format!("/{parent_name}/job");
    let age = selected_age_ms(&log, &format!("cgroup={child_path} ")).with_context(|| {
        format!(
            "no 'cgroup selected' line for {child_path}\n{}",
            log_tail(&log, 60)
        )
    })?;
    ensure!(
        log.contains("watching cgroup directories for new containers"),
        "no inotify watches in the container:\n{}",
        log_tail(&log, 60)
    );
    eprintln!(
        "{test}: in the agent container, cgroup {child_path} entered the kernel filter {age:.1} ms after it was made"
    );
    ensure!(
        age < 100.0,
        "the cgroup entered the filter {age} ms after it was made\n{}",
        log_tail(&log, 60)
    );
    drop(server);
    drop(agent);
    drop(child);
    drop(parent);
    Ok(())
}
