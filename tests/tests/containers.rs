//! Container selection and identity with real containers. A private dockerd (Debian's
//! docker.io) runs two containers of an image built from Debian's python3, gunicorn, flask and
//! gevent (no registry), each serving HTTP on its own loopback port (host network). The agent
//! started with `--container <one of them>` traces that one only, its spans carry
//! `container.id` and `container.name`, and its greenlet hooks attach through
//! `/proc/<pid>/root` (the image keeps its packages at a path the host does not have). A
//! plain cgroup with its own pid namespace (unshare) is selected with `--cgroup`.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use difytrace_tests::{
    agent::Agent,
    agentstats::selected_age_ms,
    cgroups::{OwnCgroup, cgroup2_root},
    docker::{Dockerd, IMAGE_PYTHONPATH, Unavailable},
    goapp::{self, GoApp, GoTool},
    otlp_receiver::{OtlpReceiver, ReceivedSpan, ensure_resource, paths_with, summarize},
    procs::{Proc, free_port, http_get, local, wait_port, wait_port_of},
    python::python,
};

/// The app both containers serve.
const APP: &str = r#"
import os
from flask import Flask
app = Flask(__name__)

@app.route("/<path:p>")
def any_path(p):
    return "ok %s\n" % p, 200, {"X-Worker-Pid": str(os.getpid())}
"#;

const IMAGE: &str = "difytrace-test:1";

fn dockerd_or_skip(test: &str) -> Option<Dockerd> {
    match Dockerd::start() {
        Ok(d) => Some(d),
        Err(Unavailable(why)) => {
            difytrace_tests::prerequisite_missing(test, &[format!("a working dockerd ({why})")])
        }
    }
}

/// `docker run` of the app on `port` with one gevent worker.
fn run_app(dk: &mut Dockerd, name: &str, port: u16) -> Result<String> {
    let bind = format!("127.0.0.1:{port}");
    let env = format!("PYTHONPATH={IMAGE_PYTHONPATH}");
    dk.run(
        name,
        &[
            "-e",
            &env,
            "-w",
            "/opt/app",
            IMAGE,
            "/usr/bin/python3",
            "-m",
            "gunicorn",
            "-k",
            "gevent",
            "-w",
            "1",
            "-b",
            &bind,
            "app:app",
        ],
    )
}

fn wait_serving(dk: &Dockerd, name: &str, port: u16) -> Result<()> {
    wait_port(local(port), Duration::from_secs(60))
        .with_context(|| format!("container {name} not serving; its log:\n{}", dk.logs(name)))
}

/// Sends 5 requests to the selected server (`selected`: port, path prefix) and 5 to the
/// other one, waits for the selected one's 5 spans and 2 s more for stragglers, and fails
/// naming `other_what` if any span of the other server came; returns every span received.
fn only_selected_traced(
    rx: &OtlpReceiver,
    agent: &Agent,
    selected: (u16, &str),
    other: (u16, &str),
    other_what: &str,
) -> Result<Vec<ReceivedSpan>> {
    for i in 0..5 {
        // http.server answers 404 for files it does not have: still a request and a span.
        http_get(local(selected.0), &format!("{}{i}", selected.1), &[])?;
        http_get(local(other.0), &format!("{}{i}", other.1), &[])?;
    }
    let spans = rx
        .wait_for(|s| paths_with(s, selected.1).len() >= 5, SPAN_WAIT)
        .map_err(|e| agent.annotate(e))?;
    std::thread::sleep(Duration::from_secs(2));
    let spans: Vec<_> = rx.spans().into_iter().chain(spans).collect();
    let from_other = paths_with(&spans, other.1);
    ensure!(
        from_other.is_empty(),
        "{other_what} was traced:\n{}",
        summarize(&from_other, 10)
    );
    Ok(spans)
}

#[test]
fn container_filter_traces_only_the_named_docker_container() -> Result<()> {
    let test = "container_filter_traces_only_the_named_docker_container";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let Some(mut dk) = dockerd_or_skip(test) else {
        return Ok(());
    };
    dk.build_python_image(IMAGE, APP, &[])?;
    let tag = random_hex(8);
    let (name_a, name_b) = (format!("dt-a-{tag}"), format!("dt-b-{tag}"));
    let (port_a, port_b) = (free_port(), free_port());
    // B runs before the agent, A starts after it: both the containers found at start and
    // the ones that appear later must be handled.
    run_app(&mut dk, &name_b, port_b)?;
    wait_serving(&dk, &name_b, port_b)?;
    let rx = OtlpReceiver::start()?;
    let socket = dk.socket().to_string_lossy().into_owned();
    let agent = Agent::start(&[
        "--container",
        &name_a,
        "--docker-socket",
        &socket,
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;
    let id_a = run_app(&mut dk, &name_a, port_a)?;
    wait_serving(&dk, &name_a, port_a)?;
    let id_b = dk.docker(&["inspect", "--format", "{{.Id}}", &name_b])?;

    // The container's cgroup enters the kernel filter within a refresh of its start: ask
    // until A's first request is traced.
    let a_prefix = format!("/a-{tag}/");
    let b_prefix = format!("/b-{tag}/");
    let deadline = Instant::now() + SPAN_WAIT;
    let mut n = 0;
    loop {
        n += 1;
        http_get(local(port_a), &format!("{a_prefix}warm{n}"), &[])?;
        http_get(local(port_b), &format!("{b_prefix}warm{n}"), &[])?;
        if !paths_with(&rx.spans(), &a_prefix).is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no span from container A ({name_a}) after {n} requests\n{}",
            agent.logs(80)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for i in 0..10 {
        let ra = http_get(local(port_a), &format!("{a_prefix}{i}"), &[])?;
        let rb = http_get(local(port_b), &format!("{b_prefix}{i}"), &[])?;
        ensure!(ra.status == 200 && rb.status == 200, "{ra:?} {rb:?}");
    }
    let spans = rx
        .wait_for(
            |s| {
                (0..10).all(|i| {
                    let p = format!("{a_prefix}{i}");
                    s.iter()
                        .any(|x| x.attr_str("url.path").as_deref() == Some(&p))
                })
            },
            SPAN_WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    // B's spans would have been exported with A's; give stragglers a moment anyway.
    std::thread::sleep(Duration::from_secs(2));
    let spans = rx.spans().into_iter().chain(spans).collect::<Vec<_>>();
    let from_b = paths_with(&spans, &b_prefix);
    ensure!(
        from_b.is_empty(),
        "container B ({name_b}) was traced:\n{}",
        summarize(&from_b, 10)
    );
    let from_a = paths_with(&spans, &a_prefix);
    ensure!(from_a.len() >= 10, "{}", summarize(&spans, 40));
    for span in &spans {
        // Nothing outside A is traced at all (the test process, B, the host).
        ensure!(
            span.res_str("container.id").as_deref() == Some(id_a.as_str()),
            "span without A's container.id {id_a} (B is {id_b}): {}\nresource: {:?}",
            span.summary(),
            span.res_str("container.id")
        );
        ensure!(
            span.res_str("container.name").as_deref() == Some(name_a.as_str()),
            "span without container.name {name_a}: {} (container.name {:?})",
            span.summary(),
            span.res_str("container.name")
        );
        ensure!(
            span.res_str("container.image.name").as_deref() == Some("difytrace-test"),
            "container.image.name: {:?}",
            span.res_str("container.image.name")
        );
        ensure!(
            span.res_str("container.runtime.name").as_deref() == Some("docker"),
            "container.runtime.name: {:?}",
            span.res_str("container.runtime.name")
        );
    }
    // The gevent worker's greenlet module exists only inside the image: hooked through the
    // container's root.
    let log = agent.stderr();
    let hooked = log.lines().any(|l| {
        l.contains("native uprobes attached")
            && l.contains("/root/opt/difytrace-py/greenlet/_greenlet")
            && l.contains("/proc/")
    });
    ensure!(
        hooked,
        "greenlet of container A not hooked through /proc/<pid>/root:\n{}",
        agent.logs(80)
    );
    let pid_a = dk.pid_of(&name_a)?;
    ensure!(
        !log.contains(&format!("/proc/{}/root", dk.pid_of(&name_b)?)),
        "container B's files were hooked (A's first pid is {pid_a})\n{}",
        agent.logs(80)
    );
    drop(agent);

    // Without the runtime's API an id prefix still selects: ids come from the cgroups.
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start(&[
        "--container",
        &id_a[..12],
        "--docker-socket",
        "/nonexistent/docker.sock",
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;
    let prefix_a = format!("/ida-{tag}/");
    let prefix_b = format!("/idb-{tag}/");
    let spans = only_selected_traced(
        &rx,
        &agent,
        (port_a, &prefix_a),
        (port_b, &prefix_b),
        "container B, when selecting A by id,",
    )?;
    for span in paths_with(&spans, &prefix_a) {
        ensure!(
            span.res_str("container.id").as_deref() == Some(id_a.as_str())
                && span.res_str("container.name").is_none(),
            "by id without the API: container.id {:?}, container.name {:?}",
            span.res_str("container.id"),
            span.res_str("container.name")
        );
    }
    Ok(())
}

#[test]
fn go_uprobes_attach_to_a_binary_inside_a_container() -> Result<()> {
    let test = "go_uprobes_attach_to_a_binary_inside_a_container";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let missing = goapp::tools_missing();
    if !missing.is_empty() {
        return difytrace_tests::prerequisite_missing(test, &missing).unwrap_or(Ok(()));
    }
    let Some(mut dk) = dockerd_or_skip(test) else {
        return Ok(());
    };
    let app = GoApp::prepare()?;
    let variant = app.variant("go1.26")?;
    // At a path the host does not have: reachable only through the container's root.
    const INSIDE: &str = "/opt/app/godaemon-in-container";
    dk.build_python_image(IMAGE, APP, &[(variant.daemon_bin.as_path(), INSIDE)])?;
    // The tool runs on the host, outside the selection: its side is not traced.
    let tool = GoTool::start(variant)?;
    let rx = OtlpReceiver::start()?;
    let name = format!("dt-go-{}", random_hex(8));
    let socket = dk.socket().to_string_lossy().into_owned();
    let agent = Agent::start(&[
        "--container",
        &name,
        "--docker-socket",
        &socket,
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
    ])?;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let tool_url = format!("http://{}", tool.addr());
    let id = dk.run(
        &name,
        &[
            IMAGE, INSIDE, "-mode", "daemon", "-listen", &listen, "-tool", &tool_url,
        ],
    )?;
    wait_serving(&dk, &name, port)?;
    let pid = dk.pid_of(&name)?;
    let mut agent = agent;
    agent
        .wait_stderr(
            |log| {
                log.lines().any(|l| {
                    l.contains("Go uprobes attached") && l.contains(&format!("/proc/{pid}/exe"))
                })
            },
            SPAN_WAIT,
        )
        .context("Go uprobes on the container's binary")?;
    // Hooks are in: these requests are linked by goroutine and carry gin's route.
    let invs = goapp::invoke_sequential(local(port), 5)?;
    let spans = rx
        .wait_for(
            |s| {
                invs.iter().all(|inv| {
                    s.iter().any(|x| {
                        x.is_server() && x.attr_str("url.path").as_deref() == Some(&inv.path)
                    })
                })
            },
            SPAN_WAIT,
        )
        .map_err(|e| agent.annotate(e))?;
    for inv in &invs {
        let server = spans
            .iter()
            .find(|x| x.is_server() && x.attr_str("url.path").as_deref() == Some(&inv.path))
            .context("server span")?;
        ensure!(
            server.attr_str("http.route").as_deref() == Some(goapp::ROUTE),
            "no gin route from the uprobes: {}",
            server.summary()
        );
        ensure!(
            server.res_str("container.id").as_deref() == Some(id.as_str())
                && server.res_str("container.name").as_deref() == Some(name.as_str()),
            "container identity of {}: {:?} {:?}",
            server.summary(),
            server.res_str("container.id"),
            server.res_str("container.name")
        );
        let tool_path = goapp::tool_path(&inv.tenant);
        let client = spans
            .iter()
            .find(|x| x.is_client() && x.attr_str("url.path").as_deref() == Some(&tool_path))
            .with_context(|| {
                format!("no CLIENT span for {tool_path}:\n{}", summarize(&spans, 30))
            })?;
        // Made from a goroutine the handler spawned: only goroutine linking gets this.
        ensure!(
            client.parent_span_id == server.span_id,
            "CLIENT {} is not the child of SERVER {}",
            client.summary(),
            server.summary()
        );
    }
    Ok(())
}

/// A stand-in for the Kubernetes API server (or the kubelet): HTTPS with a certificate of
/// the test's own, the bearer token checked, and `GET <path>` (the API server's
/// `/api/v1/pods?fieldSelector=spec.nodeName%3D<node>`, the kubelet's `/pods`) answered with
/// the pod list in `pods.json` (written by the test, in the API's shape).
const FAKE_API_SERVER: &str = r#"
import http.server, ssl, sys
port, cert, key, token, pods, path = sys.argv[1:7]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer " + token:
            self.send_response(401); self.end_headers(); return
        if self.path != path:
            self.send_response(404); self.end_headers(); return
        body = open(pods, "rb").read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = http.server.HTTPServer(("127.0.0.1", int(port)), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("listening", flush=True)
srv.serve_forever()
"#;

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI.
fn make_certs(dir: &Path) -> Result<()> {
    let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=difytrace-test-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=kubernetes 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:kubernetes.default.svc
basicConstraints=CA:FALSE
keyUsage=digitalSignature
extendedKeyUsage=serverAuth
' > ext
openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 2 -extfile ext 2>/dev/null
"#;
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "making test certificates failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn pod_json(name: &str, ns: &str, uid: &str, app: &str, container_id: &str) -> String {
    format!(
        r#"{{"metadata":{{"name":"{name}","namespace":"{ns}","uid":"{uid}","labels":{{"app":"{app}"}}}},"spec":{{"nodeName":"node-1"}},"status":{{"phase":"Running","containerStatuses":[{{"name":"web","image":"difytrace-test:1","containerID":"docker://{container_id}","ready":true}}]}}}}"#
    )
}

#[test]
fn kubernetes_filter_by_namespace_and_label_from_the_api_server() -> Result<()> {
    let test = "kubernetes_filter_by_namespace_and_label_from_the_api_server";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let Some(dk) = dockerd_or_skip(test) else {
        return Ok(());
    };
    // Same namespace, different labels: only the label tells them apart.
    let uid_a = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let pods = TwoPods::start(
        dk,
        "k",
        "kube-api",
        [uid_a, "1f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"],
    )?;
    let TwoPods {
        ref dk,
        ref tag,
        ref name_a,
        port_a,
        port_b,
        ref id_a,
        ref dir,
        ref token,
        ..
    } = pods;
    let (api, api_port) = fake_pod_server(
        dir.path(),
        "fake-api",
        "srv.crt",
        "srv.key",
        token,
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1",
    )?;

    let rx = OtlpReceiver::start()?;
    let socket = dk.socket().to_string_lossy().into_owned();
    // The agent's environment as a DaemonSet pod would have it.
    let sa_dir = pods.service_account().to_string_lossy().into_owned();
    let port_text = api_port.to_string();
    let agent = Agent::start_with_env(
        &[
            "--k8s-namespace",
            "dify",
            "--k8s-pod-label",
            "app=api",
            "--docker-socket",
            &socket,
            "--otlp-endpoint",
            &rx.grpc_endpoint(),
        ],
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", port_text.as_str()),
            ("K8S_NODE_NAME", "node-1"),
            ("DIFYTRACE_K8S_SERVICE_ACCOUNT_DIR", sa_dir.as_str()),
        ],
    )?;
    let a_prefix = format!("/ka-{tag}/");
    let b_prefix = format!("/kb-{tag}/");
    let spans = only_selected_traced(
        &rx,
        &agent,
        (port_a, &a_prefix),
        (port_b, &b_prefix),
        "pod web-0 (label app=web)",
    )?;
    for span in paths_with(&spans, &a_prefix) {
        let want = [
            ("k8s.pod.name", "api-0"),
            ("k8s.namespace.name", "dify"),
            ("k8s.pod.uid", uid_a),
            ("k8s.container.name", "web"),
            ("k8s.node.name", "node-1"),
            ("container.id", id_a.as_str()),
            ("container.name", name_a.as_str()),
        ];
        ensure_resource(&span, &want)?;
    }
    drop(api);
    Ok(())
}

/// `python -m http.server` on `port`; inside `cgroup` (and new pid + mount namespaces via
/// unshare) when given.
fn http_server(dir: &Path, name: &str, port: u16, cgroup: Option<&Path>) -> Result<Proc> {
    let py = python();
    let serve = format!(
        "exec {} -m http.server --bind 127.0.0.1 {port}",
        py.display()
    );
    let script = match cgroup {
        Some(cg) => format!(
            "echo $$ > {}/cgroup.procs && exec unshare --pid --fork --mount-proc sh -c '{serve}'",
            cg.display()
        ),
        None => serve,
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir(dir);
    Proc::spawn(name, cmd, dir)
}

#[test]
fn cgroup_filter_traces_a_plain_cgroup_with_its_own_pid_namespace() -> Result<()> {
    let test = "cgroup_filter_traces_a_plain_cgroup_with_its_own_pid_namespace";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let Some(root) = cgroup2_root() else {
        return difytrace_tests::prerequisite_missing(test, &["a cgroup2 mount".to_string()])
            .unwrap_or(Ok(()));
    };
    let tag = random_hex(8);
    let cg_name = format!("difytrace-test-{}-{tag}", std::process::id());
    let cgroup = OwnCgroup::create(&root, &cg_name)?;
    let dir = difytrace_tests::TempDir::new("unshare")?;
    let (port_in, port_out) = (free_port(), free_port());
    let rx = OtlpReceiver::start()?;
    // Given relative to the cgroup2 root, as /proc/<pid>/cgroup prints it.
    let cg_arg = format!("/{cg_name}");
    let agent = Agent::start(&["--cgroup", &cg_arg, "--otlp-endpoint", &rx.grpc_endpoint()])?;
    let mut inside = http_server(dir.path(), "inside", port_in, Some(&cgroup.dir))?;
    let mut outside = http_server(dir.path(), "outside", port_out, None)?;
    wait_port_of(&mut inside, local(port_in), Duration::from_secs(30))?;
    wait_port_of(&mut outside, local(port_out), Duration::from_secs(30))?;
    let in_prefix = format!("/in-{tag}/");
    let out_prefix = format!("/out-{tag}/");
    let spans = only_selected_traced(
        &rx,
        &agent,
        (port_in, &in_prefix),
        (port_out, &out_prefix),
        "the server outside the cgroup",
    )?;
    let members: HashSet<u32> = cgroup.procs().into_iter().collect();
    let expected_path = format!("/{cg_name}");
    for span in paths_with(&spans, &in_prefix) {
        ensure!(
            span.res_str("difytrace.cgroup.path").as_deref() == Some(expected_path.as_str()),
            "difytrace.cgroup.path of {}: {:?}",
            span.summary(),
            span.res_str("difytrace.cgroup.path")
        );
        ensure!(
            span.res_str("container.id").is_none(),
            "a plain cgroup is no container: {:?}",
            span.res_str("container.id")
        );
        // process.pid is the host's pid (the server is pid 1 of its own namespace).
        let pid = span.pid().context("process.pid")?;
        ensure!(
            members.contains(&pid),
            "process.pid {pid} is not in the cgroup ({members:?})"
        );
    }
    drop(inside);
    drop(outside);
    drop(agent);
    drop(cgroup);
    Ok(())
}

/// Two app containers (A and B, names `dt-{prefix}a-<tag>` / `dt-{prefix}b-<tag>`) serving
/// on their own ports, described as pods api-0 (label app=api) and web-0 (app=web) of
/// namespace dify on node-1 in `dir`'s pods.json, with uids `uids`; `dir` also holds the
/// test CA's certificates, FAKE_API_SERVER, and a service-account directory with the CA and
/// a token.
struct TwoPods {
    dk: Dockerd,
    tag: String,
    name_a: String,
    port_a: u16,
    port_b: u16,
    id_a: String,
    dir: difytrace_tests::TempDir,
    token: String,
}

impl TwoPods {
    fn start(mut dk: Dockerd, prefix: &str, dir_name: &str, uids: [&str; 2]) -> Result<TwoPods> {
        dk.build_python_image(IMAGE, APP, &[])?;
        let tag = random_hex(8);
        let (name_a, name_b) = (format!("dt-{prefix}a-{tag}"), format!("dt-{prefix}b-{tag}"));
        let (port_a, port_b) = (free_port(), free_port());
        let id_a = run_app(&mut dk, &name_a, port_a)?;
        let id_b = run_app(&mut dk, &name_b, port_b)?;
        wait_serving(&dk, &name_a, port_a)?;
        wait_serving(&dk, &name_b, port_b)?;

        let dir = difytrace_tests::TempDir::new(dir_name)?;
        make_certs(dir.path())?;
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa)?;
        std::fs::copy(dir.join("ca.crt"), sa.join("ca.crt"))?;
        let token = format!("token-{tag}");
        std::fs::write(sa.join("token"), format!("{token}\n"))?;
        let pods = format!(
            r#"{{"kind":"PodList","apiVersion":"v1","items":[{},{}]}}"#,
            pod_json("api-0", "dify", uids[0], "api", &id_a),
            pod_json("web-0", "dify", uids[1], "web", &id_b)
        );
        std::fs::write(dir.join("pods.json"), pods)?;
        std::fs::write(dir.join("fake_api.py"), FAKE_API_SERVER)?;
        Ok(TwoPods {
            dk,
            tag,
            name_a,
            port_a,
            port_b,
            id_a,
            dir,
            token,
        })
    }

    fn service_account(&self) -> PathBuf {
        self.dir.join("serviceaccount")
    }
}

/// Starts a stand-in pod source (FAKE_API_SERVER answering `path` with pods.json) with a
/// certificate and key of `dir`; its process and port.
fn fake_pod_server(
    dir: &Path,
    name: &'static str,
    cert: &str,
    key: &str,
    token: &str,
    path: &str,
) -> Result<(Proc, u16)> {
    let port = free_port();
    let mut cmd = Command::new(python());
    cmd.arg(dir.join("fake_api.py"))
        .arg(port.to_string())
        .arg(dir.join(cert))
        .arg(dir.join(key))
        .arg(token)
        .arg(dir.join("pods.json"))
        .arg(path);
    let mut proc = Proc::spawn(name, cmd, dir)?;
    wait_port_of(&mut proc, local(port), Duration::from_secs(30))?;
    Ok((proc, port))
}

#[test]
fn kubernetes_filter_from_the_kubelet_with_ca_and_self_signed_certificates() -> Result<()> {
    let test = "kubernetes_filter_from_the_kubelet_with_ca_and_self_signed_certificates";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let Some(dk) = dockerd_or_skip(test) else {
        return Ok(());
    };
    let uid_a = "2f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let uid_b = "3f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let pods = TwoPods::start(dk, "kl", "kubelet", [uid_a, uid_b])?;
    let TwoPods {
        ref dk,
        ref tag,
        port_a,
        port_b,
        ref id_a,
        ref dir,
        ref token,
        ..
    } = pods;
    // What a kubelet serves by default: a certificate signed by nobody but itself.
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "self.key",
            "-out",
            "self.crt",
            "-days",
            "2",
            "-subj",
            "/CN=node-1@1764130000",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .current_dir(dir.path())
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "self-signed certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let socket = dk.socket().to_string_lossy().into_owned();
    let sa_dir = pods.service_account().to_string_lossy().into_owned();
    // No KUBERNETES_SERVICE_HOST: the kubelet is the only pod source.
    let env = [("DIFYTRACE_K8S_SERVICE_ACCOUNT_DIR", sa_dir.as_str())];

    // 1. A kubelet whose certificate the cluster CA signed (serverTLSBootstrap): verified.
    let (kubelet, kubelet_port) = fake_pod_server(
        dir.path(),
        "fake-kubelet",
        "srv.crt",
        "srv.key",
        token,
        "/pods",
    )?;
    let url = format!("https://127.0.0.1:{kubelet_port}");
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start_with_env(
        &[
            "--k8s-namespace",
            "dify",
            "--k8s-pod-label",
            "app=api",
            "--kubelet-url",
            &url,
            "--docker-socket",
            &socket,
            "--otlp-endpoint",
            &rx.grpc_endpoint(),
        ],
        &env,
    )?;
    let a_prefix = format!("/kla-{tag}/");
    let b_prefix = format!("/klb-{tag}/");
    let spans = only_selected_traced(
        &rx,
        &agent,
        (port_a, &a_prefix),
        (port_b, &b_prefix),
        "pod web-0 (label app=web)",
    )?;
    for span in paths_with(&spans, &a_prefix) {
        let want = [
            ("k8s.pod.name", "api-0"),
            ("k8s.namespace.name", "dify"),
            ("k8s.pod.uid", uid_a),
            ("k8s.container.name", "web"),
            ("k8s.node.name", "node-1"),
            ("container.id", id_a.as_str()),
        ];
        ensure_resource(&span, &want)?;
    }
    drop(agent);
    drop(kubelet);

    // 2. A kubelet with its self-signed certificate: reachable with --kubelet-insecure-tls.
    let (kubelet, kubelet_port) = fake_pod_server(
        dir.path(),
        "fake-kubelet",
        "self.crt",
        "self.key",
        token,
        "/pods",
    )?;
    let url = format!("https://127.0.0.1:{kubelet_port}");
    let rx = OtlpReceiver::start()?;
    let agent = Agent::start_with_env(
        &[
            "--k8s-pod-label",
            "app=web",
            "--kubelet-url",
            &url,
            "--kubelet-insecure-tls",
            "--docker-socket",
            &socket,
            "--otlp-endpoint",
            &rx.grpc_endpoint(),
        ],
        &env,
    )?;
    let a2 = format!("/kla2-{tag}/");
    let b2 = format!("/klb2-{tag}/");
    let spans = only_selected_traced(
        &rx,
        &agent,
        (port_b, &b2),
        (port_a, &a2),
        "pod api-0 (label app=api)",
    )?;
    for span in paths_with(&spans, &b2) {
        ensure!(
            span.res_str("k8s.pod.name").as_deref() == Some("web-0")
                && span.res_str("k8s.pod.uid").as_deref() == Some(uid_b),
            "pod of {}: {:?}",
            span.summary(),
            span.res_str("k8s.pod.name")
        );
    }
    drop(agent);
    drop(kubelet);
    Ok(())
}

#[test]
fn container_started_after_the_agent_is_traced_from_its_first_request() -> Result<()> {
    let test = "container_started_after_the_agent_is_traced_from_its_first_request";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let Some(mut dk) = dockerd_or_skip(test) else {
        return Ok(());
    };
    dk.build_python_image(IMAGE, APP, &[])?;
    let tag = random_hex(8);
    let name = format!("dt-first-{tag}");
    let port = free_port();
    let rx = OtlpReceiver::start()?;
    let socket = dk.socket().to_string_lossy().into_owned();
    let agent = Agent::start(&[
        "--container",
        &name,
        "--docker-socket",
        &socket,
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
        "--log-level",
        "info,tracer::agent=debug,tracer::discover::containers=debug",
    ])?;
    let started = Instant::now();
    let id = run_app(&mut dk, &name, port)?;
    // The first request goes out the moment the port accepts: no warm-up, no retry.
    let deadline = started + Duration::from_secs(60);
    while std::net::TcpStream::connect(local(port)).is_err() {
        ensure!(
            Instant::now() < deadline,
            "container {name} not serving; its log:\n{}",
            dk.logs(&name)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let accepting_after = started.elapsed();
    let path = format!("/first-{tag}/0");
    let first = http_get(local(port), &path, &[])?;
    ensure!(first.status == 200, "{first:?}");
    let spans = rx
        .wait_for(
            |s| {
                s.iter()
                    .any(|x| x.is_server() && x.attr_str("url.path").as_deref() == Some(&path))
            },
            SPAN_WAIT,
        )
        .map_err(|e| {
            agent.annotate(e.context(format!(
                "the container's first request (port accepting {accepting_after:?} after docker run) was not traced"
            )))
        })?;
    let span = spans
        .iter()
        .find(|x| x.is_server() && x.attr_str("url.path").as_deref() == Some(&path))
        .context("first span")?;
    ensure!(
        span.res_str("container.id").as_deref() == Some(id.as_str())
            && span.res_str("container.name").as_deref() == Some(name.as_str()),
        "container identity of the first span {}: {:?} {:?}",
        span.summary(),
        span.res_str("container.id"),
        span.res_str("container.name")
    );
    ensure!(
        span.attr_int("http.response.status_code") == Some(200),
        "status of {}",
        span.summary()
    );
    let log = agent.stderr();
    let age = selected_age_ms(&log, &id).with_context(|| {
        format!(
            "no 'cgroup selected' line with age_ms for {id}\n{}",
            agent.logs(60)
        )
    })?;
    eprintln!(
        "{test}: cgroup of {name} entered the kernel filter {age:.1} ms after it was made; port accepting {} ms after docker run started",
        accepting_after.as_millis()
    );
    for line in log
        .lines()
        .filter(|l| l.contains("new cgroups") && l.contains(&id))
    {
        eprintln!("{test}: {line}");
    }
    // Walking every second would put this anywhere up to 1000 ms (plus the runtime API's
    // listing); the inotify wake-up keeps it to the walk and one API call.
    ensure!(
        age < 500.0,
        "the cgroup entered the filter {age} ms after it was made\n{}",
        agent.logs(60)
    );
    Ok(())
}

#[test]
fn cgroup_made_after_the_agent_is_selected_within_milliseconds() -> Result<()> {
    let test = "cgroup_made_after_the_agent_is_selected_within_milliseconds";
    let Some(_e2e) = difytrace_tests::e2e(test) else {
        return Ok(());
    };
    let Some(root) = cgroup2_root() else {
        return difytrace_tests::prerequisite_missing(test, &["a cgroup2 mount".to_string()])
            .unwrap_or(Ok(()));
    };
    let tag = random_hex(8);
    let parent_name = format!("difytrace-test-{}-{tag}", std::process::id());
    let parent = OwnCgroup::create(&root, &parent_name)?;
    let rx = OtlpReceiver::start()?;
    let cg_arg = format!("/{parent_name}");
    let agent = Agent::start(&[
        "--cgroup",
        &cg_arg,
        "--otlp-endpoint",
        &rx.grpc_endpoint(),
        "--log-level",
        "info,tracer::agent=debug,tracer::discover::containers=debug",
    ])?;
    // Made after the agent: no runtime API involved, only the inotify wake-up and a walk.
    let child = OwnCgroup::create(&parent.dir, "job")?;
    let dir = difytrace_tests::TempDir::new("late-cgroup")?;
    let port = free_port();
    let started = Instant::now();
    let mut server = http_server(dir.path(), "late", port, Some(&child.dir))?;
    let deadline = started + Duration::from_secs(30);
    while std::net::TcpStream::connect(local(port)).is_err() {
        ensure!(
            server.is_running() && Instant::now() < deadline,
            "server in the new cgroup not serving\n{}",
            server.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let accepting_after = started.elapsed();
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
        agent.annotate(e.context(format!(
            "the first request to a server in a cgroup made after the agent (accepting {accepting_after:?} after start) was not traced"
        )))
    })?;
    let child_path = format!("/{parent_name}/job");
    let log = agent.stderr();
    let age = selected_age_ms(&log, &format!("cgroup={child_path} ")).with_context(|| {
        format!(
            "no 'cgroup selected' line for {child_path}\n{}",
            agent.logs(60)
        )
    })?;
    eprintln!(
        "{test}: cgroup {child_path} entered the kernel filter {age:.1} ms after it was made; the server accepted {} ms after it was started",
        accepting_after.as_millis()
    );
    ensure!(
        age < 100.0,
        "the cgroup entered the filter {age} ms after it was made\n{}",
        agent.logs(60)
    );
    drop(server);
    drop(agent);
    drop(child);
    drop(parent);
    Ok(())
}
