//! Plain-HTTP admin listener: `/live`, `/ready` (after the initial watch sync) and `/metrics`.
use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

pub async fn serve_admin(
    listener: TcpListener,
    metrics: Metrics,
    synced: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = shutdown.cancelled() => return Ok(()),
        };
        let metrics = metrics.clone();
        let synced = synced.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let res = respond(req.uri().path(), &metrics, *synced.borrow());
                async move { Ok::<_, Infallible>(res) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn respond(path: &str, metrics: &Metrics, synced: bool) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/live" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/ready" if synced => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "initial watch sync not complete\n".to_owned(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_follows_sync() {
        let m = Metrics::new();
        assert_eq!(
            respond("/ready", &m, false).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(respond("/ready", &m, true).status(), StatusCode::OK);
        assert_eq!(respond("/live", &m, false).status(), StatusCode::OK);
        assert_eq!(respond("/metrics", &m, false).status(), StatusCode::OK);
        assert_eq!(respond("/x", &m, true).status(), StatusCode::NOT_FOUND);
    }
}
