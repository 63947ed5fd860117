//! Child processes with cleanup on drop, ports, and a tiny blocking HTTP/1.1 client.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{read_lossy, tail};

// ---------------------------------------------------------------------------------------
// processes

/// A child process in its own process group, with stdout/stderr in files. Dropping it
/// stops the whole group (SIGTERM, then SIGKILL) and prints the tail of its logs, which the
/// test harness captures and shows only for a failing test.
pub struct Proc {
    name: String,
    child: Option<Child>,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Signal sent first by [`Proc::stop`] and on drop.
    pub stop_signal: i32,
    /// How long [`Proc::stop`] waits after the first signal before SIGKILL.
    pub stop_grace: Duration,
    /// Print the log tail on drop (default true). Test output is captured by the harness
    /// and shown only for failing tests (or with --nocapture).
    pub print_logs_on_drop: bool,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr to `<log_dir>/<name>.stdout`
    /// and `.stderr`, in a new process group, dying with the spawning thread (pdeathsig).
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Proc> {
        let stdout = log_dir.join(format!("{name}.stdout"));
        let stderr = log_dir.join(format!("{name}.stderr"));
        let out = std::fs::File::create(&stdout)
            .with_context(|| format!("creating {}", stdout.display()))?;
        let err = std::fs::File::create(&stderr)
            .with_context(|| format!("creating {}", stderr.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            pid: child.id(),
            child: Some(child),
            stdout,
            stderr,
            stop_signal: libc::SIGTERM,
            stop_grace: Duration::from_secs(10),
            print_logs_on_drop: true,
            exit: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout)
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// The last `n` lines of stdout and of stderr, labelled.
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "----- {name} (pid {pid}) stdout, last {n} lines ({path}) -----\n{out}\n\
             ----- {name} (pid {pid}) stderr, last {n} lines ({epath}) -----\n{err}\n",
            name = self.name,
            pid = self.pid,
            path = self.stdout.display(),
            out = tail(&self.stdout(), n),
            epath = self.stderr.display(),
            err = tail(&self.stderr(), n),
        )
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(st)) = child.try_wait()
        {
            self.exit = Some(st);
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Sends `sig` to the process (not its group).
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if !self.is_running() {
            bail!("{} (pid {}) is not running", self.name, self.pid);
        }
        // SAFETY: plain syscall on a pid we own and have not reaped.
        if unsafe { libc::kill(self.pid as libc::pid_t, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("kill({}, {sig})", self.pid));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::poll(timeout, Duration::from_millis(50), || self.try_exit())
    }

    /// Stops the process group: `stop_signal`, up to `stop_grace` for the leader to exit,
    /// then SIGKILL to the group. Returns the leader's exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let pgid = self.pid as libc::pid_t;
        if self.is_running() {
            // SAFETY: signals our own process group (we created it with process_group(0)).
            unsafe { libc::kill(-pgid, self.stop_signal) };
            self.wait_exit(self.stop_grace);
        }
        // Whatever is left of the group (workers that outlived their master).
        // SAFETY: as above; ESRCH when the group is gone is ignored.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if let Some(child) = self.child.as_mut()
            && self.exit.is_none()
        {
            self.exit = child.wait().ok();
        }
        self.exit
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if self.print_logs_on_drop {
            eprintln!("{}", self.log_tail(60));
        }
    }
}

/// Parent pid and state of `pid`, from /proc/<pid>/stat.
fn stat_of(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Live (non-zombie) children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for ent in dir.flatten() {
        let Some(p) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, state)) = stat_of(p)
            && ppid == pid
            && state != 'Z'
            && state != 'X'
        {
            out.push(p);
        }
    }
    out.sort_unstable();
    out
}

/// The command name (comm) of `pid`.
pub fn comm_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// Whether a process `pid` exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    matches!(stat_of(pid), Some((_, s)) if s != 'Z' && s != 'X')
}

/// TCP sockets in LISTEN state held by `pid` (from /proc/<pid>/fd and /proc/net/tcp{,6}).
pub fn listening_sockets(pid: u32) -> Vec<SocketAddr> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(ino.to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(a) = parse_proc_net_addr(f[1]) {
                out.push(a);
            }
        }
    }
    out.sort();
    out
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6), as in /proc/net/tcp{,6}.
fn parse_proc_net_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    let ip: std::net::IpAddr = match bytes.len() {
        4 => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
        16 => {
            let a: [u8; 16] = bytes.try_into().ok()?;
            let v6 = std::net::Ipv6Addr::from(a);
            match v6.to_ipv4_mapped() {
                Some(v4) => v4.into(),
                None => v6.into(),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

// ---------------------------------------------------------------------------------------
// ports

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("{addr} did not accept within {timeout:?}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Like [`wait_port`], but fails early when `proc` exits, with its log tail.
pub fn wait_port_of(proc: &mut Proc, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        if let Some(st) = proc.try_exit() {
            bail!(
                "{} exited ({st}) before listening on {addr}\n{}",
                proc.name(),
                proc.log_tail(40)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not listen on {addr} within {timeout:?}\n{}",
                proc.name(),
                proc.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 client

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    }
}

/// One HTTP/1.1 connection; several requests can be sent on it (keep-alive).
pub struct HttpConn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    closed: bool,
    /// Requests sent on this connection.
    pub sent: usize,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            addr,
            reader: BufReader::new(stream),
            closed: false,
            sent: 0,
        })
    }

    /// The local (client) address of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.reader.get_ref().local_addr()?)
    }

    /// Whether the server said it closes the connection (or closed it).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sends one request and reads its response. `Host` is added unless given; a
    /// `Content-Length` is added when `body` is not empty, unless a `Content-Length` or
    /// `Transfer-Encoding` header is given (then `body` goes out as it is: see [`chunked`]).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpResponse> {
        if self.closed {
            bail!("connection to {} was closed by the server", self.addr);
        }
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            let _ = write!(head, "Host: {}\r\n", self.addr);
        }
        for (k, v) in headers {
            let _ = write!(head, "{k}: {v}\r\n");
        }
        if !body.is_empty()
            && !headers.iter().any(|(k, _)| {
                k.eq_ignore_ascii_case("content-length")
                    || k.eq_ignore_ascii_case("transfer-encoding")
            })
        {
            let _ = write!(head, "Content-Length: {}\r\n", body.len());
        }
        head.push_str("\r\n");
        let stream = self.reader.get_mut();
        stream
            .write_all(head.as_bytes())
            .and_then(|_| stream.write_all(body))
            .and_then(|_| stream.flush())
            .with_context(|| format!("sending {method} {path} to {}", self.addr))?;
        self.sent += 1;
        let resp = read_response(&mut self.reader, method == "HEAD")
            .with_context(|| format!("reading response to {method} {path} from {}", self.addr))?;
        let client_close = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"));
        if resp.0.wants_close() || resp.1 || client_close {
            self.closed = true;
        }
        Ok(resp.0)
    }

    /// Sends `bytes` as they are, in one write (a whole request, or anything else), and
    /// reads one response. A connection the server closes without answering is an error.
    pub fn raw_request(&mut self, bytes: &[u8]) -> Result<HttpResponse> {
        if self.closed {
            bail!("connection to {} was closed by the server", self.addr);
        }
        let stream = self.reader.get_mut();
        stream
            .write_all(bytes)
            .and_then(|_| stream.flush())
            .with_context(|| format!("sending {} raw bytes to {}", bytes.len(), self.addr))?;
        self.sent += 1;
        let (resp, eof) = read_response(&mut self.reader, false)
            .with_context(|| format!("reading the response to raw bytes from {}", self.addr))?;
        if resp.wants_close() || eof {
            self.closed = true;
        }
        Ok(resp)
    }

    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        self.request("GET", path, headers, &[])
    }
}

/// One request on a fresh connection with `Connection: close`.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    let mut conn = HttpConn::connect(addr)?;
    let mut h: Vec<(&str, &str)> = headers.to_vec();
    if !h.iter().any(|(k, _)| k.eq_ignore_ascii_case("connection")) {
        h.push(("Connection", "close"));
    }
    conn.request(method, path, &h, body)
}

/// `GET path` on a fresh connection with `Connection: close`.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    http_request(addr, "GET", path, headers, &[])
}

/// A chunked body (`Transfer-Encoding: chunked`): one chunk per part (empty parts are
/// skipped, since an empty chunk ends the body), then the last chunk and no trailers.
pub fn chunked(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts.iter().filter(|p| !p.is_empty()) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// What a server sent back on a raw connection.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Every byte received until the server closed, reset or went quiet.
    pub bytes: Vec<u8>,
    /// The server closed (or reset) the connection; false when the read timed out.
    pub closed: bool,
}

impl RawReply {
    /// The status code of the first status line, if the reply starts with one.
    pub fn status(&self) -> Option<u16> {
        let line = self.bytes.split(|&b| b == b'\n').next()?;
        let line = std::str::from_utf8(line).ok()?;
        let mut parts = line.split(' ');
        parts.next().filter(|v| v.starts_with("HTTP/"))?;
        parts.next()?.parse().ok()
    }

    /// The first line, for messages.
    pub fn first_line(&self) -> String {
        let line = self.bytes.split(|&b| b == b'\n').next().unwrap_or_default();
        String::from_utf8_lossy(line).trim_end().to_string()
    }
}

/// Sends `bytes` on a fresh connection in one write (then half-closes it when
/// `half_close`), and reads until the server closes it or stays silent for `quiet`.
/// Failing to write because the server already closed is not an error.
pub fn raw_exchange(
    addr: SocketAddr,
    bytes: &[u8],
    half_close: bool,
    quiet: Duration,
) -> Result<RawReply> {
    use std::io::{ErrorKind, Read};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(quiet))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    stream.set_nodelay(true)?;
    match stream.write_all(bytes).and_then(|_| stream.flush()) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
        Err(e) => return Err(e).with_context(|| format!("writing raw bytes to {addr}")),
    }
    if half_close {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut reply = RawReply {
        bytes: Vec::new(),
        closed: false,
    };
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                reply.closed = true;
                return Ok(reply);
            }
            Ok(n) => reply.bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(reply);
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                reply.closed = true;
                return Ok(reply);
            }
            Err(e) => return Err(e).with_context(|| format!("reading from {addr}")),
        }
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut buf = Vec::new();
    let n = r.read_until(b'\n', &mut buf)?;
    if n == 0 {
        bail!("connection closed");
    }
    while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
        buf.pop();
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads one response; the bool says the body was delimited by EOF (connection is done).
fn read_response(r: &mut impl BufRead, head_only: bool) -> Result<(HttpResponse, bool)> {
    loop {
        let status_line = read_line(r)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/") {
            bail!("bad status line {status_line:?}");
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let reason = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let line = read_line(r)?;
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut resp = HttpResponse {
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) {
            continue; // interim response, the real one follows
        }
        if head_only || status == 204 || status == 304 {
            return Ok((resp, false));
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            resp.body = read_chunked(r)?;
            return Ok((resp, false));
        }
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().context("bad content-length")?;
            let mut body = vec![0; len];
            r.read_exact(&mut body)?;
            resp.body = body;
            return Ok((resp, false));
        }
        r.read_to_end(&mut resp.body)?;
        return Ok((resp, true));
    }
}

/// Decodes a chunked body (trailers are read and dropped).
pub fn read_chunked(r: &mut impl BufRead) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .with_context(|| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            loop {
                if read_line(r)?.is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        let crlf = read_line(r)?;
        if !crlf.is_empty() {
            bail!("missing CRLF after chunk");
        }
    }
}

/// Runs `work(state, i)` for every `i` of `numbers` on at most `in_flight` worker threads,
/// released together; each worker has its own `state` (from `init`, e.g. a keep-alive
/// connection). Returns the results in `numbers` order.
pub fn concurrently<S, T: Send>(
    numbers: std::ops::Range<usize>,
    in_flight: usize,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize) -> T + Sync,
) -> Vec<T> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let workers = in_flight.clamp(1, numbers.len().max(1));
    let next = AtomicUsize::new(numbers.start);
    let start = std::sync::Barrier::new(workers);
    let out = std::sync::Mutex::new(Vec::with_capacity(numbers.len()));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                start.wait();
                let mut state = init();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= numbers.end {
                        break;
                    }
                    let result = work(&mut state, i);
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, result));
                }
            });
        }
    });
    let mut out = out.into_inner().unwrap_or_else(|p| p.into_inner());
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    #[test]
    fn parses_chunked_and_length_responses() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\n\
                    HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n\
                    HTTP/1.1 500 INTERNAL SERVER ERROR\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfail";
        let mut r = BufReader::new(Cursor::new(&raw[..]));
        let (a, eof) = read_response(&mut r, false).unwrap();
        assert_eq!(
            (a.status, a.text().as_str(), eof),
            (200, "hello world", false)
        );
        let (b, _) = read_response(&mut r, false).unwrap();
        assert_eq!((b.status, b.text().as_str()), (500, "fail"));
        assert!(b.wants_close());
    }

    #[test]
    fn chunked_bodies_round_trip() {
        let body = chunked(&[b"hello", b"", b" world", &[b'x'; 300]]);
        assert!(body.starts_with(b"5\r\nhello\r\n6\r\n world\r\n12c\r\n"));
        assert!(body.ends_with(b"\r\n0\r\n\r\n"));
        let mut r = BufReader::new(Cursor::new(&body[..]));
        let decoded = read_chunked(&mut r).unwrap();
        assert_eq!(decoded.len(), 11 + 300);
        assert!(decoded.starts_with(b"hello world"));
    }

    #[test]
    fn raw_exchange_reads_until_close_or_quiet() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            // 1st: answers and closes; 2nd: reads to EOF (half-close), answers nothing,
            // keeps the connection open until the client is gone.
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"GARBAGE\r\n\r\n");
            s.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                .unwrap();
            drop(s);
            let (mut s, _) = listener.accept().unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            assert_eq!(all, b"\x16\x03\x01");
            let _ = done_rx.recv();
        });
        let r = raw_exchange(addr, b"GARBAGE\r\n\r\n", false, Duration::from_secs(10)).unwrap();
        assert!(r.closed);
        assert_eq!(r.status(), Some(400));
        assert_eq!(r.first_line(), "HTTP/1.1 400 Bad Request");
        let r = raw_exchange(addr, b"\x16\x03\x01", true, Duration::from_millis(300)).unwrap();
        assert!(!r.closed && r.bytes.is_empty() && r.status().is_none());
        done_tx.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn parses_proc_net_addresses() {
        assert_eq!(
            parse_proc_net_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_net_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let a = l.local_addr().unwrap();
        assert!(listening_sockets(std::process::id()).contains(&a));
    }

    #[test]
    fn keep_alive_against_a_local_server() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for i in 0..3 {
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                loop {
                    let mut l = String::new();
                    r.read_line(&mut l).unwrap();
                    if l == "\r\n" {
                        break;
                    }
                }
                let body = format!("{}#{i}", first.split(' ').nth(1).unwrap());
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
        });
        let mut c = HttpConn::connect(addr).unwrap();
        for i in 0..3 {
            let r = c.get(&format!("/k{i}"), &[("X-Test", "1")]).unwrap();
            assert_eq!(r.text(), format!("/k{i}#{i}"));
        }
        assert!(!c.is_closed());
        server.join().unwrap();
    }
}
