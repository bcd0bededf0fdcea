//! Opening a connection to the relay: the request (URL, extra headers, the
//! bearer token read fresh from its file at every connect, credentials from
//! the URL), TLS for `wss://`, and the registration, all within the
//! registration timeout; and a relay's close frames, in words. The URL's
//! credentials are used here and shown nowhere: see [`without_credentials`].

use std::sync::Arc;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::{debug, info};

use super::{LinkOptions, READ_BUFFER_BYTES};
use crate::codec::{self, Frame, Registration};
use crate::status::Counters;

pub(super) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection attempt did not end registered.
#[derive(Debug)]
pub(super) enum AttemptError {
    /// The relay answered the registration with `success: false`.
    Refused(String),
    /// The relay closed the socket, with this code.
    Closed { code: Option<u16>, reason: String },
    /// Anything else: refused TCP connection, DNS, TLS, timeout, protocol.
    Other(String),
}

/// Opens the WebSocket and registers, within the registration timeout.
pub(super) async fn connect(
    options: &LinkOptions,
    counters: &Counters,
) -> Result<Socket, AttemptError> {
    let deadline = Instant::now() + options.registration_timeout;
    let request = request(options)?;
    let connector = match &options.tls {
        Some(config) => Connector::Rustls(Arc::clone(config)),
        None => Connector::Plain,
    };
    // Whatever the relay sends us, within reason: its own limit is 1 MiB.
    let largest = options.max_message_bytes.max(1 << 20) * 2;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(largest))
        .max_frame_size(Some(largest));
    let shown = without_credentials(&options.url);
    debug!(url = %shown, "connecting to relay");
    let (mut socket, _) = timeout_at(
        deadline,
        tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        ),
    )
    .await
    .map_err(|_| AttemptError::Other("timed out opening the WebSocket".into()))?
    .map_err(|e| AttemptError::Other(format!("cannot open the WebSocket: {e}")))?;

    let registration = Frame::Registration(Registration {
        name: options.name.clone(),
        uuid: options.uuid,
    });
    socket
        .send(Message::text(codec::encode(&registration, options.dialect)))
        .await
        .map_err(|e| AttemptError::Other(format!("cannot send the registration: {e}")))?;

    loop {
        let next = timeout_at(deadline, socket.next())
            .await
            .map_err(|_| AttemptError::Other("no answer to the registration in time".into()))?;
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = close_parts(frame);
                return Err(AttemptError::Closed { code, reason });
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(AttemptError::Other(format!("during registration: {e}"))),
            None => {
                return Err(AttemptError::Closed {
                    code: None,
                    reason: "closed during registration".into(),
                });
            }
        };
        return match codec::decode(&text, options.dialect) {
            Ok(Frame::Response(r)) if r.success => {
                info!(uuid = %options.uuid, name = %options.name, url = %shown, "registered with the relay");
                Ok(socket)
            }
            Ok(Frame::Response(r)) => Err(AttemptError::Refused(
                r.message.unwrap_or_else(|| "no reason given".into()),
            )),
            Ok(_) => Err(AttemptError::Other(
                "the relay answered the registration with an unexpected message".into(),
            )),
            Err(e) => {
                Counters::add(&counters.undecodable, 1);
                Err(AttemptError::Other(format!(
                    "undecodable answer to the registration: {e}"
                )))
            }
        };
    }
}

/// The handshake request: URL, extra headers, and authorization: the bearer
/// token read fresh from its file, else an `Authorization` header from the
/// settings, else the URL's credentials as HTTP Basic (as ProxyStore's
/// `websockets` client sends them).
fn request(options: &LinkOptions) -> Result<Request, AttemptError> {
    let mut request = options
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| AttemptError::Other(format!("relay_url: {e}")))?;
    let basic = basic_authorization(&options.url);
    let headers = request.headers_mut();
    if let Some(value) = basic {
        headers.insert(header::AUTHORIZATION, value);
    }
    for (name, value) in &options.headers {
        if name == header::AUTHORIZATION {
            headers.remove(header::AUTHORIZATION);
        }
        headers.append(name.clone(), value.clone());
    }
    if let Some(path) = &options.token_file {
        let token = std::fs::read_to_string(path).map_err(|e| {
            AttemptError::Other(format!("cannot read token_file {}: {e}", path.display()))
        })?;
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                AttemptError::Other(format!(
                    "token_file {} holds characters not allowed in a header",
                    path.display()
                ))
            })?;
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    Ok(request)
}

/// The `user:password@` part of `url`'s authority, if it has one, and where
/// it starts.
fn userinfo(url: &str) -> Option<(usize, &str)> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    Some((start, &authority[..=at]))
}

/// `url` without the user name and password it may carry
/// (`ws://user:secret@host/x` shows as `ws://host/x`): what logs and
/// `GetStatus` show.
pub fn without_credentials(url: &str) -> String {
    match userinfo(url) {
        Some((start, info)) => format!("{}{}", &url[..start], &url[start + info.len()..]),
        None => url.to_owned(),
    }
}

/// `Authorization: Basic ...` from the URL's credentials, percent-decoded.
fn basic_authorization(url: &str) -> Option<HeaderValue> {
    let (_, info) = userinfo(url)?;
    let info = info.strip_suffix('@').unwrap_or(info);
    let (user, password) = info.split_once(':').unwrap_or((info, ""));
    let mut plain = percent_encoding::percent_decode_str(user).collect::<Vec<u8>>();
    plain.push(b':');
    plain.extend(percent_encoding::percent_decode_str(password));
    let encoded = base64::engine::general_purpose::STANDARD.encode(plain);
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A close frame's code and reason.
pub(super) fn close_parts(frame: Option<CloseFrame>) -> (Option<u16>, String) {
    match frame {
        Some(frame) => (Some(u16::from(frame.code)), frame.reason.to_string()),
        None => (None, String::new()),
    }
}

/// A close from the relay in words: the code, what it means, the reason.
pub(super) fn describe_close(code: Option<u16>, reason: &str) -> String {
    let Some(code) = code else {
        return "the relay closed the connection without a close code".into();
    };
    let meaning = match code {
        1000 => "normal closure",
        1001 => "going away",
        1002 => "protocol error",
        1007 => "invalid data",
        1008 => "policy violation",
        1009 => "message too big",
        1011 => "internal error",
        4000 => "unknown message",
        4001 => "unauthorized",
        4002 => "forbidden",
        4003 => "message too large",
        4004 => "this uuid was registered by another connection",
        _ => "",
    };
    let mut text = format!("the relay closed the connection with {code}");
    if !meaning.is_empty() {
        text.push_str(&format!(" ({meaning})"));
    }
    if !reason.is_empty() {
        text.push_str(&format!(": {reason}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_taken_out_of_the_url_shown() {
        for (url, shown) in [
            ("wss://relay.org/x", "wss://relay.org/x"),
            (
                "ws://me:s3cret@relay.org:8700/x?y=@",
                "ws://relay.org:8700/x?y=@",
            ),
            ("ws://tok@h:1", "ws://h:1"),
            ("ws://a:b@c@h", "ws://h"),
            ("ws://h/p@q", "ws://h/p@q"),
        ] {
            assert_eq!(without_credentials(url), shown, "{url}");
        }
    }

    #[test]
    fn credentials_become_basic_authorization() {
        let value = basic_authorization("ws://alice:p%40ss@h:1/").unwrap();
        assert_eq!(value.to_str().unwrap(), "Basic YWxpY2U6cEBzcw==");
        assert!(value.is_sensitive());
        assert_eq!(
            basic_authorization("ws://tok@h").unwrap().to_str().unwrap(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("tok:")
            )
        );
        assert!(basic_authorization("ws://h/a@b").is_none());
    }

    #[test]
    fn closes_are_described_with_their_meaning() {
        assert_eq!(
            describe_close(Some(1001), ""),
            "the relay closed the connection with 1001 (going away)"
        );
        assert_eq!(
            describe_close(Some(1008), "not reading"),
            "the relay closed the connection with 1008 (policy violation): not reading"
        );
        assert!(describe_close(None, "").contains("without a close code"));
    }
}
