//! The optional HTTP `/metrics` listener (config `[metrics] listen`): a
//! loopback address only, GET only, through hyper. The unit keeps
//! `PrivateNetwork=yes` unless the drop-in that enables this is installed
//! (systemd/vtpmd-metrics-http.conf).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Format;

/// Scrapers at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;
/// A scraper must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the listener renders on each GET.
pub type Render = Arc<dyn Fn(Format) -> String + Send + Sync>;

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "[metrics] listen = {addr}: only a loopback address may serve metrics (the API stays local)"
    )]
    NotLoopback { addr: SocketAddr },
    #[error("cannot listen on {addr} for metrics")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `addr` (a loopback address) and serves until the task is aborted.
/// Returns the address bound (port 0 picks one) and the serving task.
pub async fn serve(
    addr: SocketAddr,
    render: Render,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    if !addr.ip().is_loopback() {
        return Err(HttpError::NotLoopback { addr });
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    let task = tokio::spawn(accept_loop(listener, render));
    Ok((bound, task))
}

async fn accept_loop(listener: TcpListener, render: Render) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, Arc::clone(&render)));
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("metrics listener: connection ended: {e}");
            }
            drop(permit);
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    render: Render,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(plain(StatusCode::NOT_FOUND, "not found: try /metrics\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    // Prometheus asks for OpenMetrics first; anything else gets 0.0.4.
    let wants_openmetrics = req
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let format = if wants_openmetrics {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    };
    let body = if req.method() == Method::HEAD {
        String::new()
    } else {
        render(format)
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    Ok(response)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}
