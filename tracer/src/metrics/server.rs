//! `GET /metrics` in the Prometheus text format, served from a tokio task. The event loop is
//! only asked for a [`Snapshot`] (a clone of its counters) through a bounded channel; the
//! rendering and the socket I/O happen here. Anything but `GET /metrics` gets 404 or 400.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

use super::{Snapshot, prometheus};

/// A scrape asking the event loop for a snapshot.
pub type SnapshotRequest = oneshot::Sender<Snapshot>;
/// Scrapes waiting for the event loop, at most.
pub const REQUEST_QUEUE: usize = 8;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// Longest request head read.
const MAX_HEAD: usize = 8192;
/// A client must send its request within this, and the loop answer within this.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (at start, so a taken port fails the start with a clear error).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Accepts connections until the runtime stops.
pub async fn serve(listener: TcpListener, snapshots: mpsc::Sender<SnapshotRequest>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::debug!(%err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let active = Arc::clone(&active);
        let snapshots = snapshots.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, &snapshots).await {
                tracing::debug!(%err, "metrics endpoint: connection failed");
            }
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    BadRequest,
}

/// Reads the request line of a head (pure).
fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|b| *b == b'\n').next() else {
        return Route::BadRequest;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || target.is_empty() {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", _) => Route::NotFound,
        _ if method.bytes().all(|b| b.is_ascii_uppercase()) && !method.is_empty() => {
            Route::BadMethod
        }
        _ => Route::BadRequest,
    }
}

async fn handle(
    mut stream: TcpStream,
    snapshots: &mpsc::Sender<SnapshotRequest>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(read, Ok(Ok(true)));
    let route = if complete {
        route(&head)
    } else {
        Route::BadRequest
    };
    let (status, content_type, body) = match route {
        Route::Metrics => match snapshot(snapshots).await {
            Some(snapshot) => (
                "200 OK",
                prometheus::CONTENT_TYPE,
                prometheus::render(&snapshot),
            ),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "the agent did not answer in time\n".into(),
            ),
        },
        Route::NotFound => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        Route::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
        ),
        Route::BadRequest => ("400 Bad Request", "text/plain", "bad request\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(TIMEOUT, stream.write_all(response.as_bytes()))
        .await
        .map_err(std::io::Error::other)??;
    let _ = stream.shutdown().await;
    Ok(())
}

async fn snapshot(snapshots: &mpsc::Sender<SnapshotRequest>) -> Option<Snapshot> {
    let (tx, rx) = oneshot::channel();
    snapshots.try_send(tx).ok()?;
    tokio::time::timeout(TIMEOUT, rx).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"\x16\x03\x01garbage\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
    }
}
