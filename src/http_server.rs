//! The one HTTP server loop of both binaries (the controller's API, the agent's
//! `/metrics`): an axum router served on hyper's HTTP/1 with the limits `axum::serve`
//! lacks.
//!
//! Owns: accepting under a connection cap, the header-read timeout, the request body cap,
//! the per-request timeout and the bounded graceful shutdown ([`Limits`]).
//! Must not: know routes or authentication (callers layer those on the router).
//!
//! Guarantees (tests below):
//! - A client that has not sent a whole request head within `header_read_timeout` is cut
//!   off (`slowloris_client_is_cut_off_after_the_header_timeout`). The same timer bounds an
//!   idle keep-alive connection: hyper starts it as soon as the connection waits for the
//!   next request head (`idle_keep_alive_connection_is_closed_after_the_header_timeout`).
//! - At most `max_connections` connections are open. Excess connections are not refused:
//!   they wait unaccepted in the kernel's listen backlog until one closes
//!   (`connections_beyond_the_cap_wait_unserved`).
//! - A request body over `max_body_bytes` gets 413 (`oversized_body_gets_413`); a request
//!   whose handler runs longer than `request_timeout` gets 503
//!   (`a_request_beyond_the_request_timeout_gets_503`).
//! - After `shutdown`, nothing new is accepted, open connections finish their requests
//!   and close; after `shutdown_grace` the rest are dropped, so `serve` returns even with
//!   hung clients (`shutdown_with_a_hung_client_ends_within_the_grace`,
//!   `eight_hundred_half_open_connections_do_not_hold_shutdown`).
//!
//! Caveats: HTTP/1 only (both servers are scraped or polled by HTTP/1 clients).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// Limits of one server. The defaults suit a status API and a metrics endpoint: small
/// GET requests, a few scrapers and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest time to receive a request head, and longest idle keep-alive wait.
    pub header_read_timeout: Duration,
    /// Longest time a handler may take; then 503.
    pub request_timeout: Duration,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request body; more gets 413.
    pub max_body_bytes: usize,
    /// After shutdown, how long open connections may take to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 128,
            max_body_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serve `router` on `listener` under `limits` until `shutdown`, then drain within the
/// grace. Accept errors (e.g. out of file descriptors) are logged and retried.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let app = router
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            limits.request_timeout,
        ));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut conns = JoinSet::new();
    loop {
        // The permit is taken before accepting: at the cap, connections stay in the backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(problem = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let svc = TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(problem = %e, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            grace_s = limits.shutdown_grace.as_secs_f64(),
            "shutdown grace over: dropping the connections still open"
        );
        conns.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn app() -> Router {
        Router::new()
            .route("/", get(|| async { "ok\n" }))
            .route("/echo", post(|body: axum::body::Bytes| async move { body }))
            .route(
                "/hang",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    "late"
                }),
            )
    }

    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, app(), limits, stop.clone()));
        (addr, stop)
    }

    /// Read until the peer closes (Ok(bytes)) or `within` passes (Err).
    async fn read_to_close(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, ()> {
        let mut out = Vec::new();
        tokio::time::timeout(within, s.read_to_end(&mut out))
            .await
            .map_err(|_| ())
            .map(|_| out)
    }

    async fn get_ok(s: &mut TcpStream) -> String {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 1024];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn slowloris_client_is_cut_off_after_the_header_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let t0 = Instant::now();
        let head =
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut cut = false;
        for b in head {
            if s.write_all(&[*b]).await.is_err() {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // The server closed: a read returns EOF (or reset) at once.
            let mut probe = [0u8; 256];
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
            {
                assert!(
                    !String::from_utf8_lossy(&probe).starts_with("HTTP/1.1 200"),
                    "a slowloris request was served"
                );
                let _ = r;
                cut = true;
                break;
            }
        }
        let took = t0.elapsed();
        println!("slowloris cut off after {took:?} (header timeout 500ms, 50ms per byte)");
        assert!(cut, "the connection outlived the whole slow head");
        assert!(
            took >= Duration::from_millis(400),
            "cut before the timeout: {took:?}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn idle_keep_alive_connection_is_closed_after_the_header_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(get_ok(&mut s).await.starts_with("HTTP/1.1 200"));
        let t0 = Instant::now();
        read_to_close(&mut s, Duration::from_secs(10))
            .await
            .expect("an idle keep-alive connection stays open");
        println!("idle keep-alive connection closed after {:?}", t0.elapsed());
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_unserved() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        assert!(get_ok(&mut a).await.starts_with("HTTP/1.1 200"));
        assert!(get_ok(&mut b).await.starts_with("HTTP/1.1 200"));
        // The third connects (the kernel's backlog) but is not served while two are open.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(700), c.read(&mut buf))
                .await
                .is_err(),
            "a connection beyond the cap was served"
        );
        drop(a);
        let t0 = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("served once a slot frees")
            .unwrap();
        println!(
            "third connection served {:?} after a slot freed",
            t0.elapsed()
        );
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        drop(b);
        stop.cancel();
    }

    #[tokio::test]
    async fn oversized_body_gets_413() {
        let limits = Limits {
            max_body_bytes: 1024,
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        crate::one::http::ensure_crypto_provider();
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/echo");
        let r = client
            .post(&url)
            .body(vec![b'x'; 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = client
            .post(&url)
            .body(vec![b'x'; 1025])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_request_beyond_the_request_timeout_gets_503() {
        let limits = Limits {
            request_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer after the request timeout")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 503"));
        stop.cancel();
    }

    #[tokio::test]
    async fn shutdown_with_a_hung_client_ends_within_the_grace() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let limits = Limits {
            shutdown_grace: Duration::from_millis(500),
            header_read_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let server = tokio::spawn(serve(listener, app(), limits, stop.clone()));
        // One in-flight request that never finishes, one half-sent head, one idle.
        let mut hung = TcpStream::connect(addr).await.unwrap();
        hung.write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        assert!(get_ok(&mut idle).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve outlived its grace")
            .unwrap();
        let took = t0.elapsed();
        println!("shutdown with hung clients took {took:?} (grace 500ms)");
        assert!(read_to_close(&mut hung, Duration::from_secs(1))
            .await
            .is_ok());
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    /// Issue #17's observation: 800 half-open connections kept the controller from
    /// stopping. Now they hold it for at most the grace.
    #[tokio::test]
    async fn eight_hundred_half_open_connections_do_not_hold_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        // All 800 accepted (beyond the cap plus the listen backlog, connects stall in SYN
        // retries until the header timeout frees slots).
        let limits = Limits {
            shutdown_grace: Duration::from_secs(1),
            max_connections: 1000,
            ..Limits::default()
        };
        let server = tokio::spawn(serve(listener, app(), limits, stop.clone()));
        let mut open = Vec::new();
        for _ in 0..800 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
            open.push(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("800 half-open connections held shutdown")
            .unwrap();
        println!(
            "shutdown with 800 half-open connections took {:?} (grace 1s)",
            t0.elapsed()
        );
        drop(open);
    }
}
