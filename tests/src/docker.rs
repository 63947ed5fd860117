//! A private Docker daemon for the container tests: Debian's dockerd on its own socket,
//! data-root and exec-root under a temp dir, no bridge and no iptables (containers use the
//! host network only), an image built from the host's own Debian Python files with `docker
//! import` (no registry), and containers removed and the daemon stopped on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::procs::Proc;
use crate::{TempDir, poll, tail};

/// Where the image's Python packages live inside it: a path the host does not have, so a
/// file the agent finds in a container's memory maps is only reachable through
/// `/proc/<pid>/root`.
pub const IMAGE_PYTHONPATH: &str = "/opt/difytrace-py";

/// Debian's docker client (package docker.io), the one `build` prefers.
pub const DEBIAN_DOCKER: &str = "/usr/bin/docker";

/// The Debian interpreter the image is built from (python3-flask, gunicorn, python3-gevent).
pub const DEBIAN_PYTHON: &str = "/usr/bin/python3.11";

/// A running dockerd of our own.
pub struct Dockerd {
    proc: Option<Proc>,
    dir: TempDir,
    socket: PathBuf,
    containers: Vec<String>,
}

/// Why the daemon could not be used: the test then says "skipped" with this.
pub struct Unavailable(pub String);

impl Dockerd {
    /// Starts dockerd; `Err(Unavailable)` when there is none or it cannot start here.
    pub fn start() -> std::result::Result<Dockerd, Unavailable> {
        let Some(dockerd) = which("dockerd") else {
            return Err(Unavailable(
                "no dockerd on PATH (Debian package docker.io)".into(),
            ));
        };
        if which("docker").is_none() {
            return Err(Unavailable(
                "no docker client on PATH (Debian package docker.io)".into(),
            ));
        }
        let dir = TempDir::new("dockerd").map_err(|e| Unavailable(format!("temp dir: {e}")))?;
        // Unix socket paths are limited to 108 bytes; the temp dir may be deep.
        let socket = PathBuf::from(format!("/tmp/difytrace-dk-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(dockerd);
        cmd.arg("--bridge=none")
            .arg("--iptables=false")
            .arg("--ip6tables=false")
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            // Its own containerd, not the host's.
            .env_remove("DOCKER_HOST");
        let proc = Proc::spawn("dockerd", cmd, dir.path())
            .map_err(|e| Unavailable(format!("spawning dockerd: {e:#}")))?;
        let mut me = Dockerd {
            proc: Some(proc),
            dir,
            socket,
            containers: Vec::new(),
        };
        let up = poll(Duration::from_secs(60), Duration::from_millis(200), || {
            if let Some(p) = me.proc.as_mut()
                && !p.is_running()
            {
                return Some(false);
            }
            me.docker(&["version", "--format", "{{.Server.Version}}"])
                .ok()
                .map(|_| true)
        });
        if up != Some(true) {
            let log = me.proc.as_ref().map(|p| p.log_tail(30)).unwrap_or_default();
            return Err(Unavailable(format!("dockerd did not come up:\n{log}")));
        }
        Ok(me)
    }

    /// The daemon's API socket (for the agent's `--docker-socket`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs the docker client against this daemon; its stdout, trimmed.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env_remove("DOCKER_HOST")
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .output()
            .with_context(|| format!("running docker {args:?}"))?;
        if !out.status.success() {
            bail!(
                "docker {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Builds the test image: Debian's python3.11 with its standard library, flask, gunicorn
    /// and gevent from Debian's packages (under IMAGE_PYTHONPATH), the shared libraries they
    /// load, `app` as /opt/app/app.py, and each `(host file, path in the image)` of `extra`
    /// (executables whose libraries the image already has, e.g. a Go binary needing only
    /// libc). Imported, so no registry is involved.
    pub fn build_python_image(&self, tag: &str, app: &str, extra: &[(&Path, &str)]) -> Result<()> {
        let rootfs = self.dir.join("rootfs");
        let _ = std::fs::remove_dir_all(&rootfs);
        std::fs::create_dir_all(rootfs.join("opt/app"))?;
        std::fs::write(rootfs.join("opt/app/app.py"), app)?;
        for (host, inside) in extra {
            let dest = rootfs.join(inside.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(host, &dest)
                .with_context(|| format!("copying {} into the image", host.display()))?;
        }
        let script = self.dir.join("build-rootfs.sh");
        std::fs::write(&script, BUILD_ROOTFS)?;
        let out = Command::new("bash")
            .arg(&script)
            .arg(&rootfs)
            .arg(DEBIAN_PYTHON)
            .arg(IMAGE_PYTHONPATH)
            .output()
            .context("running the rootfs build script")?;
        if !out.status.success() {
            bail!(
                "building the image rootfs failed ({}):\n{}\n{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stdout), 20),
                tail(&String::from_utf8_lossy(&out.stderr), 20)
            );
        }
        let tar = self.dir.join("rootfs.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .context("running tar")?;
        if !status.success() {
            bail!("tar of the rootfs failed: {status}");
        }
        let tar_path = tar.to_string_lossy().into_owned();
        self.docker(&["import", &tar_path, tag])?;
        Ok(())
    }

    /// `docker build` with BuildKit (which builds only the stages the target uses: the
    /// classic builder runs every stage, and a stage FROM a registry image cannot be pulled
    /// here). The client is Debian's (docker.io 20.10 has BuildKit built in; docker >= 23
    /// clients need the buildx plugin for it). Returns the build's output.
    pub fn build(
        &self,
        dockerfile: &Path,
        context: &Path,
        build_args: &[(&str, &str)],
        tag: &str,
    ) -> Result<String> {
        let client = if Path::new(DEBIAN_DOCKER).is_file() {
            DEBIAN_DOCKER
        } else {
            "docker"
        };
        let mut cmd = Command::new(client);
        cmd.arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["build", "--progress", "plain", "-f"])
            .arg(dockerfile)
            .args(["-t", tag]);
        for (key, value) in build_args {
            cmd.arg("--build-arg").arg(format!("{key}={value}"));
        }
        let out = cmd
            .arg(context)
            .env_remove("DOCKER_HOST")
            .env("DOCKER_BUILDKIT", "1")
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .output()
            .with_context(|| format!("running {client} build"))?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!(
                "{client} build -f {} failed ({}):\n{}",
                dockerfile.display(),
                out.status,
                tail(&log, 40)
            );
        }
        Ok(log)
    }

    /// `docker run -d --network host --name <name> <args...>`; the full container id.
    pub fn run(&mut self, name: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["run", "-d", "--network", "host", "--name", name];
        all.extend_from_slice(args);
        self.containers.push(name.to_string());
        let id = self.docker(&all)?;
        if id.len() != 64 {
            bail!("docker run printed {id:?}, not a container id");
        }
        Ok(id)
    }

    /// The host pid of a container's first process.
    pub fn pid_of(&self, name: &str) -> Result<u32> {
        self.docker(&["inspect", "--format", "{{.State.Pid}}", name])?
            .parse()
            .context("container pid")
    }

    /// A container's log (stdout and stderr), for failure messages.
    pub fn logs(&self, name: &str) -> String {
        match Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["logs", "--tail", "40", name])
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(err) => format!("(docker logs failed: {err})"),
        }
    }
}

/// Detaches every mount under `dir`, deepest first (what a container runtime left there
/// would keep the directory busy).
pub fn unmount_under(dir: &Path) {
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in mounts {
        if let Ok(c) = std::ffi::CString::new(mount) {
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        for name in std::mem::take(&mut self.containers) {
            let _ = self.docker(&["rm", "-f", &name]);
        }
        if let Some(mut proc) = self.proc.take() {
            // SIGTERM lets dockerd stop its containerd and unmount its layers.
            proc.stop_signal = libc::SIGTERM;
            proc.stop_grace = Duration::from_secs(20);
            proc.print_logs_on_drop = std::thread::panicking();
            proc.stop();
        }
        // Anything dockerd left mounted under its roots (its netns file, layers) would keep
        // the temp dir busy.
        unmount_under(self.dir.path());
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// bash script: rootfs dir, interpreter, package dir inside the image.
const BUILD_ROOTFS: &str = r#"set -euo pipefail
R=$1; PY=$2; PKG=$3
mkdir -p "$R/usr/bin" "$R/usr/lib" "$R/usr/lib64" "$R/tmp" "$R/etc" "$R/proc" "$R/sys" "$R/dev" "$R$PKG"
chmod 1777 "$R/tmp"
ln -sfn usr/bin "$R/bin"; ln -sfn usr/lib "$R/lib"; ln -sfn usr/lib64 "$R/lib64"
cp -L "$PY" "$R/usr/bin/python3"
VER=$(basename "$PY")
tar -C / --exclude="usr/lib/$VER/test" --exclude="usr/lib/$VER/idlelib" \
    --exclude="usr/lib/$VER/tkinter" --exclude="usr/lib/$VER/ensurepip" \
    --exclude="usr/lib/$VER/lib2to3" --exclude="usr/lib/$VER/config-*" \
    -cf - "usr/lib/$VER" | tar -C "$R" -xf -
# The Debian packages the app imports, found by importing them on the host.
PKGS=$("$PY" -c '
import sys, flask, gunicorn.app.wsgiapp, gunicorn.workers.ggevent, gevent, gevent.pywsgi
names = set()
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None) or ""
    if f.startswith("/usr/lib/python3/dist-packages/"):
        names.add(f.split("/")[5])
print(" ".join(sorted(names)))')
for p in $PKGS; do cp -a "/usr/lib/python3/dist-packages/$p" "$R$PKG/"; done
# Shared libraries of the interpreter and of every extension module, by their ldd names.
find "$R" -name '*.so*' -type f > "$R/../sofiles"
echo "$PY" >> "$R/../sofiles"
LIBS=$(xargs -a "$R/../sofiles" ldd 2>/dev/null | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | sort -u)
for l in $LIBS; do cp -L --parents "$l" "$R"; done
rm -f "$R/../sofiles"
"#;
