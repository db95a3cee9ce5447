//! A deliberately small blocking HTTP/1.1 client: one keep-alive connection, one request in
//! flight, nothing between the socket and the clock. Good enough for a loopback benchmark and
//! cheap enough that the load generator does not become what is measured.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("connection closed by peer")]
    Closed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("only http://IP:PORT/PATH URLs are supported")]
    Unsupported,
    #[error("the benchmark talks to loopback only")]
    NotLoopback,
}

/// Where requests go: a loopback socket address, the Host header and the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or(TargetError::Unsupported)?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        let addr: SocketAddr = authority.parse().map_err(|_| TargetError::Unsupported)?;
        if !addr.ip().is_loopback() {
            return Err(TargetError::NotLoopback);
        }
        Ok(Target {
            addr,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The bytes of one keep-alive GET, with `headers` ("Name: value") added.
    pub fn get_request(&self, headers: &[String]) -> Vec<u8> {
        let mut request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", self.path, self.authority);
        for header in headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        request.into_bytes()
    }
}

/// What one response amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body_len: usize,
    /// The server said `Connection: close`: the next request needs a new connection.
    pub close: bool,
}

pub struct Connection {
    stream: BufReader<TcpStream>,
}

impl Connection {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Connection {
            stream: BufReader::with_capacity(16 * 1024, stream),
        })
    }

    pub fn round_trip(&mut self, request: &[u8]) -> Result<Reply, ClientError> {
        self.stream.get_mut().write_all(request)?;
        read_response(&mut self.stream)
    }
}

/// Reads one response (status line, headers, body by Content-Length or chunked) and discards
/// the body, counting its bytes.
pub fn read_response<R: BufRead>(reader: &mut R) -> Result<Reply, ClientError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(ClientError::Closed);
    }
    let status = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(ClientError::Malformed("status line"))?;
    let mut content_length = None;
    let mut chunked = false;
    let mut close = line.starts_with("HTTP/1.0");
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        let header = line.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            break;
        }
        let (name, value) = header
            .split_once(':')
            .ok_or(ClientError::Malformed("header"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| ClientError::Malformed("content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let body_len = if chunked {
        read_chunked(reader)?
    } else {
        let length = content_length.ok_or(ClientError::Malformed("no body length"))?;
        discard_exact(reader, length)?;
        length
    };
    Ok(Reply {
        status,
        body_len,
        close,
    })
}

fn read_chunked<R: BufRead>(reader: &mut R) -> Result<usize, ClientError> {
    let mut total = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        let size_text = line.trim_end_matches(['\r', '\n']);
        let size_text = size_text.split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size_text.trim(), 16)
            .map_err(|_| ClientError::Malformed("chunk size"))?;
        if size == 0 {
            // Trailers, then the empty line that ends the message.
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Err(ClientError::Closed);
                }
                if line.trim_end_matches(['\r', '\n']).is_empty() {
                    return Ok(total);
                }
            }
        }
        discard_exact(reader, size + 2)?;
        total += size;
    }
}

fn discard_exact<R: Read>(reader: &mut R, length: usize) -> Result<(), ClientError> {
    let copied = io::copy(&mut reader.take(length as u64), &mut io::sink())?;
    if copied as usize == length {
        Ok(())
    } else {
        Err(ClientError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn parses_loopback_urls_only() {
        let target = Target::parse("http://127.0.0.1:18082/stripe/v1/customers/cus_1").unwrap();
        assert_eq!(target.addr, "127.0.0.1:18082".parse().unwrap());
        assert_eq!(target.path, "/stripe/v1/customers/cus_1");
        assert_eq!(Target::parse("http://127.0.0.1:80").unwrap().path, "/");
        assert_eq!(
            Target::parse("http://10.0.0.1:80/"),
            Err(TargetError::NotLoopback)
        );
        assert_eq!(
            Target::parse("https://127.0.0.1:80/"),
            Err(TargetError::Unsupported)
        );
    }

    #[test]
    fn request_carries_host_and_headers() {
        let target = Target::parse("http://127.0.0.1:9/a").unwrap();
        let request = target.get_request(&["Authorization: Bearer k".into()]);
        assert_eq!(
            String::from_utf8(request).unwrap(),
            "GET /a HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAuthorization: Bearer k\r\n\r\n"
        );
    }

    #[test]
    fn reads_two_keep_alive_responses_back_to_back() {
        let wire = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcHTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let mut reader = Cursor::new(wire.as_bytes());
        assert_eq!(
            read_response(&mut reader).unwrap(),
            Reply {
                status: 200,
                body_len: 3,
                close: false
            }
        );
        assert_eq!(
            read_response(&mut reader).unwrap(),
            Reply {
                status: 401,
                body_len: 0,
                close: true
            }
        );
        assert!(matches!(
            read_response(&mut reader),
            Err(ClientError::Closed)
        ));
    }

    #[test]
    fn reads_chunked_bodies() {
        let wire = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\na;x=y\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        let reply = read_response(&mut Cursor::new(wire.as_bytes())).unwrap();
        assert_eq!(reply.body_len, 14);
    }

    #[test]
    fn truncated_body_is_an_error() {
        let wire = "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc";
        assert!(read_response(&mut Cursor::new(wire.as_bytes())).is_err());
    }
}
