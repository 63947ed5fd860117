//! Container names and pods from CRI, with a real containerd: a private containerd (Debian's
//! package, its CRI plugin on, own socket and dirs) runs two pod sandboxes on the host network,
//! made through CRI calls by the test as the kubelet would make them (kubelet-shaped pod
//! cgroups and labels), each with a container serving HTTP on its own loopback port. The
//! image is the container tests' Debian-python image (built with the private dockerd, saved,
//! and imported with `ctr`; no registry). The agent, given only `--cri-socket` (no Docker
//! socket, no Kubernetes API), selects one container by name and then one pod by namespace
//! and label, and its spans carry the container's and pod's names from CRI.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use difytrace_tests::{
    agent::Agent,
    cri::{self, Containerd, PodSpec},
    docker::{Dockerd, IMAGE_PYTHONPATH, Unavailable},
    otlp_receiver::{OtlpReceiver, ReceivedSpan, ensure_resource, paths_with, summarize},
    procs::{free_port, http_get, local, wait_port},
};

const APP: &str = r#"
from flask import Flask
app = Flask(__name__)

@app.route("/<path:p>")
def any_path(p):
    return "ok %s\n" % p
"#;

/// The sandbox ("pause") process: the image's command, sleeping until stopped.
const PAUSE_CMD: &str = r#"CMD ["/usr/bin/python3", "-c", "import signal; signal.signal(signal.SIGTERM, lambda *a: exit(0)); signal.pause()"]"#;

/// Builds the Debian-python image with a private dockerd, gives it the sandbox command, and
/// saves it as an archive `ctr` can import.
fn image_archive(test: &str, dir: &difytrace_tests::TempDir) -> Result<Option<std::path::PathBuf>> {
    let dk = match Dockerd::start() {
        Ok(d) => d,
        Err(Unavailable(why)) => {
            return Ok(difytrace_tests::prerequisite_missing(
                test,
                &[format!("a working dockerd to build the image ({why})")],
            ));
        }
    };
    dk.build_python_image("difytrace-cri-base:1", APP, &[])?;
    let holder = format!("dt-cri-commit-{}", random_hex(6));
    dk.docker(&[
        "create",
        "--name",
        &holder,
        "difytrace-cri-base:1",
        "/usr/bin/python3",
    ])?;
    let committed = dk.docker(&["commit", "--change", PAUSE_CMD, &holder, "difytrace-cri:1"]);
    dk.docker(&["rm", "-f", &holder])?;
    committed?;
    let tar = dir.join("difytrace-cri.tar");
    let tar_text = tar.to_string_lossy().into_owned();
    dk.docker(&["save", "-o", &tar_text, "difytrace-cri:1"])?;
    Ok(Some(tar))
}

/// Runs the app in a pod of its own; the pod's sandbox config and the container id.
fn run_app_pod(
    ctd: &mut Containerd,
    pod: &PodSpec,
    container: &str,
    port: u16,
) -> Result<((String, cri::proto::PodSandboxConfig), String)> {
    let sandbox = ctd
        .run_pod(pod)
        .with_context(|| format!("pod {}; containerd log:\n{}", pod.name, ctd.log_tail(30)))?;
    let bind = format!("127.0.0.1:{port}");
    let id = ctd
        .run_container(
            &sandbox,
            container,
            &[
                "/usr/bin/python3",
                "-m",
                "gunicorn",
                "-w",
                "1",
                "-b",
                &bind,
                "app:app",
            ],
            &[("PYTHONPATH", IMAGE_PYTHONPATH)],
            "/opt/app",
        )
        .with_context(|| {
            format!(
                "container {container}; containerd log:\n{}",
                ctd.log_tail(30)
            )
        })?;
    wait_port(local(port), Duration::from_secs(60)).with_context(|| {
        format!(
            "{container} not serving; its log:\n{}",
            ctd.container_log(&sandbox.1, container)
        )
    })?;
    Ok((sandbox, id))
}

/// Requests to both servers until the selected one's spans come; fails if the other one's
/// did; the selected one's spans.
fn only_selected_traced(
    rx: &OtlpReceiver,
    agent: &Agent,
    selected: (u16, &str),
    other: (u16, &str),
) -> Result<Vec<ReceivedSpan>> {
    // The container's cgroup enters the kernel filter within a refresh of the agent's start.
    let deadline = std::time::Instant::now() + SPAN_WAIT;
    let mut n = 0;
    while paths_with(&rx.spans(), selected.1).len() < 5 {
        ensure!(
            std::time::Instant::now() < deadline,
            "no spans from the selected container after {n} rounds\n{}",
            agent.logs(80)
        );
        http_get(local(selected.0), &format!("{}{n}", selected.1), &[])?;
        http_get(local(other.0), &format!("{}{n}", other.1), &[])?;
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    // Stragglers of the other server would have come with these.
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans();
    let from_other = paths_with(&spans, other.1);
    ensure!(
        from_other.is_empty(),
        "the other container was traced:\n{}",
        summarize(&from_other, 10)
    );
    Ok(paths_with(&spans, selected.1))
}

#[test]
fn container_and_pod_selection_from_containerd_cri() -> Result<()> {
    let test = "container_and_pod_selection_from_containerd_cri";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let dir = difytrace_tests::TempDir::new("cri-test")?;
    let Some(archive) = image_archive(test, &dir)? else {
        return Ok(());
    };
    let mut ctd = match Containerd::start() {
        Ok(c) => c,
        Err(Unavailable(why)) => {
            // Panics with the reason unless skipping was asked for.
            let _: Option<()> = difytrace_tests::prerequisite_missing(
                test,
                &[format!("containerd with its CRI plugin ({why})")],
            );
            return Ok(());
        }
    };
    let version = ctd.version()?;
    ctd.import_image(&archive)?;

    let tag = random_hex(8);
    let (uid_a, uid_b) = (
        format!("0a0a0a0a-0000-4000-8000-{}", random_hex(12)),
        format!("0b0b0b0b-0000-4000-8000-{}", random_hex(12)),
    );
    let (pod_a, pod_b) = (format!("api-{tag}"), format!("web-{tag}"));
    let (name_a, name_b) = (format!("ca-{tag}"), format!("cb-{tag}"));
    let (port_a, port_b) = (free_port(), free_port());
    let (_, id_a) = run_app_pod(
        &mut ctd,
        &PodSpec {
            name: &pod_a,
            namespace: "dify",
            uid: &uid_a,
            labels: &[("app", "api")],
        },
        &name_a,
        port_a,
    )?;
    let (_, id_b) = run_app_pod(
        &mut ctd,
        &PodSpec {
            name: &pod_b,
            namespace: "dify",
            uid: &uid_b,
            labels: &[("app", "web")],
        },
        &name_b,
        port_b,
    )?;
    let socket = ctd.socket().to_string_lossy().into_owned();
    let a_prefix = format!("/cra-{tag}/");
    let b_prefix = format!("/crb-{tag}/");
    // No Docker socket (the path does not exist) and no Kubernetes API: CRI only.
    let no_docker = dir.join("no-docker.sock").to_string_lossy().into_owned();

    // By container name; a second CRI socket that does not exist changes nothing.
    let missing = dir.join("no-cri.sock").to_string_lossy().into_owned();
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&[
        "--container",
        &name_a,
        "--cri-socket",
        &missing,
        "--cri-socket",
        &socket,
        "--docker-socket",
        &no_docker,
        "--k8s-node-name",
        "node-1",
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;
    let spans = only_selected_traced(&rx, &agent, (port_a, &a_prefix), (port_b, &b_prefix))?;
    let logs = agent.logs(200);
    ensure!(
        logs.contains("--cri-socket does not exist")
            && logs.contains(&format!("runtime={} ", version.runtime_name)),
        "no warning about the missing CRI socket, or no answer from the real one:\n{}",
        agent.logs(80)
    );
    for span in &spans {
        ensure_resource(
            span,
            &[
                ("container.id", id_a.as_str()),
                ("container.name", name_a.as_str()),
                ("container.runtime.name", version.runtime_name.as_str()),
                ("container.image.name", "docker.io/library/difytrace-cri"),
                ("container.image.tags", "[1]"),
                ("k8s.pod.name", pod_a.as_str()),
                ("k8s.pod.uid", uid_a.as_str()),
                ("k8s.namespace.name", "dify"),
                ("k8s.container.name", name_a.as_str()),
                ("k8s.node.name", "node-1"),
            ],
        )?;
    }
    drop(agent);

    // By namespace and pod label (the sandbox's labels), the other pod this time.
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&[
        "--k8s-namespace",
        "dify",
        "--k8s-pod-label",
        "app=web",
        "--cri-socket",
        &socket,
        "--docker-socket",
        &no_docker,
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;
    let b2 = format!("/crb2-{tag}/");
    let a2 = format!("/cra2-{tag}/");
    let spans = only_selected_traced(&rx, &agent, (port_b, &b2), (port_a, &a2))?;
    for span in &spans {
        ensure_resource(
            span,
            &[
                ("container.id", id_b.as_str()),
                ("container.name", name_b.as_str()),
                ("k8s.pod.name", pod_b.as_str()),
                ("k8s.pod.uid", uid_b.as_str()),
                ("k8s.namespace.name", "dify"),
                ("k8s.container.name", name_b.as_str()),
            ],
        )?;
    }
    drop(agent);
    drop(ctd);
    Ok(())
}
