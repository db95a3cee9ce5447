//! A minimal keep-alive HTTP/1.1 server with a fixed body: the "vendor" behind every target.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the upstream answers.
#[derive(Clone)]
pub struct Upstream {
    body: Bytes,
    expect_authorization: Option<Arc<str>>,
}

impl Upstream {
    pub fn new(body_bytes: usize, expect_authorization: Option<String>) -> Self {
        Upstream {
            body: Bytes::from(vec![b'x'; body_bytes]),
            expect_authorization: expect_authorization.map(Arc::from),
        }
    }

    pub fn respond<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        let authorized = match &self.expect_authorization {
            None => true,
            Some(expected) => request
                .headers()
                .get(header::AUTHORIZATION)
                .is_some_and(|got| got.as_bytes() == expected.as_bytes()),
        };
        let (status, body) = if authorized {
            (StatusCode::OK, self.body.clone())
        } else {
            (
                StatusCode::UNAUTHORIZED,
                Bytes::from_static(b"wrong upstream credential\n"),
            )
        };
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("static response parts are valid")
    }
}

/// Accepts connections forever, one task per connection, keep-alive on.
pub async fn serve(listener: TcpListener, upstream: Upstream) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        // Small responses: do not let Nagle hold them back.
        stream.set_nodelay(true)?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = upstream.respond(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            // A client hanging up mid-request is normal under load; nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn answers_fixed_body_and_checks_the_credential() {
        let upstream = Upstream::new(1024, Some("Bearer sk_test_upstream".into()));
        let good = Request::get("/v1/x")
            .header(header::AUTHORIZATION, "Bearer sk_test_upstream")
            .body(())
            .unwrap();
        let response = upstream.respond(&good);
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1024);

        let bad = Request::get("/v1/x")
            .header(header::AUTHORIZATION, "Bearer vault_key_x")
            .body(())
            .unwrap();
        assert_eq!(upstream.respond(&bad).status(), StatusCode::UNAUTHORIZED);
    }
}
