//! The relay's wire format: JSON text frames in the current (ProxyStore 0.6+)
//! and legacy (0.5.x) dialects, encoded and decoded strictly.
//!
//! The Python side builds each message with exactly the keys of its kind, so
//! an extra key is an error there; decoding here is just as strict, so that a
//! frame we accept is one the reference client would accept too.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Which generation of the relay protocol a relay speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// ProxyStore 0.6 and later (`relay_registration`, `relay_response`).
    #[default]
    Current,
    /// ProxyStore 0.5.x (`server_registration`, `server_response`).
    Legacy,
}

impl Dialect {
    fn registration_type(self) -> &'static str {
        match self {
            Dialect::Current => "relay_registration",
            Dialect::Legacy => "server_registration",
        }
    }

    fn response_type(self) -> &'static str {
        match self {
            Dialect::Current => "relay_response",
            Dialect::Legacy => "server_response",
        }
    }

    /// The name used in config and status ("current" or "legacy").
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Current => "current",
            Dialect::Legacy => "legacy",
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dialect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "current" => Ok(Dialect::Current),
            "legacy" => Ok(Dialect::Legacy),
            other => Err(format!(
                "unknown dialect {other:?} (expected \"current\" or \"legacy\")"
            )),
        }
    }
}

/// The two values of `description_type` that ProxyStore peers send.
pub const DESCRIPTION_TYPES: [&str; 2] = ["offer", "answer"];

/// A registration request: the first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub name: String,
    pub uuid: Uuid,
}

/// The relay's answer to a registration (and, on the legacy relay, to a
/// message from an unregistered socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayResponse {
    pub success: bool,
    pub message: Option<String>,
    pub error: bool,
}

/// A peer connection message, carried unchanged between peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConnection {
    pub source_uuid: Uuid,
    pub source_name: String,
    pub peer_uuid: Uuid,
    pub description_type: String,
    pub description: String,
    pub error: Option<String>,
}

/// Any frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Registration(Registration),
    Response(RelayResponse),
    Peer(PeerConnection),
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a JSON object with known keys: {0}")]
    Json(String),
    #[error("no message_type key")]
    MissingType,
    #[error("unknown message_type {0:?} for the {1} dialect")]
    UnknownType(String, Dialect),
    #[error("key {0:?} is not part of a {1} message")]
    UnexpectedKey(&'static str, &'static str),
    #[error("missing key {0:?}")]
    MissingKey(&'static str),
    #[error("key {0:?} must not be null")]
    NullKey(&'static str),
    #[error("key {0:?} is not a valid UUID")]
    BadUuid(&'static str),
    #[error("key \"error\" has the wrong type for a {0} message")]
    BadErrorType(&'static str),
}

/// One frame as it appears on the wire, every key optional, so that a single
/// pass decodes any kind and the key set can then be checked per kind.
/// `Some(None)` is a key present with value `null`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrame<'a> {
    #[serde(borrow)]
    message_type: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    name: Option<Option<Cow<'a, str>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    uuid: Option<Option<Cow<'a, str>>>,
    #[serde(default, deserialize_with = "present")]
    success: Option<Option<bool>>,
    #[serde(default, borrow, deserialize_with = "present")]
    message: Option<Option<Cow<'a, str>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    error: Option<ErrorValue<'a>>,
    #[serde(default, borrow, deserialize_with = "present")]
    source_uuid: Option<Option<Cow<'a, str>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    source_name: Option<Option<Cow<'a, str>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    peer_uuid: Option<Option<Cow<'a, str>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    description_type: Option<Option<Cow<'a, str>>>,
    #[serde(default, borrow, deserialize_with = "present")]
    description: Option<Option<Cow<'a, str>>>,
}

/// Marks a key as present (whatever its value, `null` included).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// `error` is a bool in a relay response and a string or null in a peer
/// connection message.
enum ErrorValue<'a> {
    Null,
    Bool(bool),
    Text(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for ErrorValue<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ErrorValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a bool, a string or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ErrorValue::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ErrorValue::Null)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(ErrorValue::Bool(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ErrorValue::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ErrorValue::Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

fn required(value: Option<Option<Cow<'_, str>>>, key: &'static str) -> Result<String, DecodeError> {
    match value {
        None => Err(DecodeError::MissingKey(key)),
        Some(None) => Err(DecodeError::NullKey(key)),
        Some(Some(v)) => Ok(v.into_owned()),
    }
}

fn required_uuid(
    value: Option<Option<Cow<'_, str>>>,
    key: &'static str,
) -> Result<Uuid, DecodeError> {
    // Parsed where it lies: no copy of the text first.
    match value {
        None => Err(DecodeError::MissingKey(key)),
        Some(None) => Err(DecodeError::NullKey(key)),
        Some(Some(text)) => Uuid::parse_str(&text).map_err(|_| DecodeError::BadUuid(key)),
    }
}

fn reject(present: bool, key: &'static str, kind: &'static str) -> Result<(), DecodeError> {
    if present {
        Err(DecodeError::UnexpectedKey(key, kind))
    } else {
        Ok(())
    }
}

/// Decodes one text frame in the given dialect.
pub fn decode(text: &str, dialect: Dialect) -> Result<Frame, DecodeError> {
    let mut raw: RawFrame<'_> =
        serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    let kind = raw.message_type.take().ok_or(DecodeError::MissingType)?;
    if kind == dialect.registration_type() {
        const KIND: &str = "registration";
        reject(raw.success.is_some(), "success", KIND)?;
        reject(raw.message.is_some(), "message", KIND)?;
        reject(raw.error.is_some(), "error", KIND)?;
        reject_peer_keys(&raw, KIND)?;
        Ok(Frame::Registration(Registration {
            name: required(raw.name, "name")?,
            uuid: required_uuid(raw.uuid, "uuid")?,
        }))
    } else if kind == dialect.response_type() {
        const KIND: &str = "relay response";
        reject(raw.name.is_some(), "name", KIND)?;
        reject(raw.uuid.is_some(), "uuid", KIND)?;
        reject_peer_keys(&raw, KIND)?;
        let success = match raw.success {
            None => true,
            Some(None) => return Err(DecodeError::NullKey("success")),
            Some(Some(v)) => v,
        };
        let error = match raw.error {
            None => false,
            Some(ErrorValue::Bool(v)) => v,
            Some(_) => return Err(DecodeError::BadErrorType(KIND)),
        };
        Ok(Frame::Response(RelayResponse {
            success,
            message: raw.message.flatten().map(Cow::into_owned),
            error,
        }))
    } else if kind == "peer_connection" {
        const KIND: &str = "peer connection";
        reject(raw.name.is_some(), "name", KIND)?;
        reject(raw.uuid.is_some(), "uuid", KIND)?;
        reject(raw.success.is_some(), "success", KIND)?;
        reject(raw.message.is_some(), "message", KIND)?;
        let error = match raw.error {
            None | Some(ErrorValue::Null) => None,
            Some(ErrorValue::Text(t)) => Some(t.into_owned()),
            Some(ErrorValue::Bool(_)) => return Err(DecodeError::BadErrorType(KIND)),
        };
        Ok(Frame::Peer(PeerConnection {
            source_uuid: required_uuid(raw.source_uuid, "source_uuid")?,
            source_name: required(raw.source_name, "source_name")?,
            peer_uuid: required_uuid(raw.peer_uuid, "peer_uuid")?,
            description_type: required(raw.description_type, "description_type")?,
            description: required(raw.description, "description")?,
            error,
        }))
    } else {
        Err(DecodeError::UnknownType(kind.into_owned(), dialect))
    }
}

fn reject_peer_keys(raw: &RawFrame<'_>, kind: &'static str) -> Result<(), DecodeError> {
    reject(raw.source_uuid.is_some(), "source_uuid", kind)?;
    reject(raw.source_name.is_some(), "source_name", kind)?;
    reject(raw.peer_uuid.is_some(), "peer_uuid", kind)?;
    reject(raw.description_type.is_some(), "description_type", kind)?;
    reject(raw.description.is_some(), "description", kind)
}

// The wire shapes for encoding: keys in the order the Python dataclasses
// declare them, `message_type` last, UUIDs hyphenated lowercase.

#[derive(Serialize)]
struct RegistrationOut<'a> {
    name: &'a str,
    uuid: &'a uuid::fmt::Hyphenated,
    message_type: &'static str,
}

#[derive(Serialize)]
struct ResponseOut<'a> {
    success: bool,
    message: Option<&'a str>,
    error: bool,
    message_type: &'static str,
}

/// Encodes one frame as JSON text in the given dialect.
pub fn encode(frame: &Frame, dialect: Dialect) -> String {
    let encoded = match frame {
        Frame::Registration(r) => serde_json::to_string(&RegistrationOut {
            name: &r.name,
            uuid: &r.uuid.hyphenated(),
            message_type: dialect.registration_type(),
        }),
        Frame::Response(r) => serde_json::to_string(&ResponseOut {
            success: r.success,
            message: r.message.as_deref(),
            error: r.error,
            message_type: dialect.response_type(),
        }),
        Frame::Peer(p) => {
            return encode_peer(
                p.source_uuid,
                &p.source_name,
                p.peer_uuid,
                &p.description_type,
                &p.description,
                p.error.as_deref(),
            );
        }
    };
    // Serialising plain strings, bools and UUIDs into a String cannot fail.
    encoded.expect("relay frames always serialise")
}

/// Encodes a peer connection message (the same in both dialects) from
/// borrowed parts, byte for byte as [`encode`] of the owned frame would.
///
/// This is every send's path, so it writes into one buffer of the right
/// size and copies strings that need no escaping as they are; serde_json
/// escapes the rest.
pub fn encode_peer(
    source_uuid: Uuid,
    source_name: &str,
    peer_uuid: Uuid,
    description_type: &str,
    description: &str,
    error: Option<&str>,
) -> String {
    const FIXED: usize = r#"{"source_uuid":"","source_name":"","peer_uuid":"","description_type":"","description":"","error":null,"message_type":"peer_connection"}"#.len() + 2 * 36;
    let strings = source_name.len() + description_type.len() + description.len();
    let mut out = Vec::with_capacity(FIXED + strings + error.map_or(0, |e| e.len() + 2) + 16);
    let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.extend_from_slice(br#"{"source_uuid":""#);
    out.extend_from_slice(source_uuid.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.extend_from_slice(br#"","source_name":"#);
    json_string(&mut out, source_name);
    out.extend_from_slice(br#","peer_uuid":""#);
    out.extend_from_slice(peer_uuid.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.extend_from_slice(br#"","description_type":"#);
    json_string(&mut out, description_type);
    out.extend_from_slice(br#","description":"#);
    json_string(&mut out, description);
    out.extend_from_slice(br#","error":"#);
    match error {
        Some(error) => json_string(&mut out, error),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","message_type":"peer_connection"}"#);
    // Only whole UTF-8 strings and ASCII went in.
    String::from_utf8(out).expect("JSON built from str is UTF-8")
}

/// Appends `text` as a JSON string, as serde_json writes it.
fn json_string(out: &mut Vec<u8>, text: &str) {
    // No early exit, so that the check runs many bytes at a time.
    let plain = text.as_bytes().iter().fold(true, |plain, &b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1e569226-4748-4528-b2d6-4ed1865b721f";
    const B: &str = "6e54d44c-779f-4725-bfe6-ca267bb0e63d";

    fn peer() -> PeerConnection {
        PeerConnection {
            source_uuid: A.parse().unwrap(),
            source_name: "host-a".into(),
            peer_uuid: B.parse().unwrap(),
            description_type: "offer".into(),
            description: "v=0\r\n\"quoted\"".into(),
            error: None,
        }
    }

    #[test]
    fn registration_shape_per_dialect() {
        let frame = Frame::Registration(Registration {
            name: "host-a".into(),
            uuid: A.parse().unwrap(),
        });
        assert_eq!(
            encode(&frame, Dialect::Current),
            format!(r#"{{"name":"host-a","uuid":"{A}","message_type":"relay_registration"}}"#)
        );
        assert_eq!(
            encode(&frame, Dialect::Legacy),
            format!(r#"{{"name":"host-a","uuid":"{A}","message_type":"server_registration"}}"#)
        );
    }

    #[test]
    fn response_shape_per_dialect() {
        let frame = Frame::Response(RelayResponse {
            success: true,
            message: None,
            error: false,
        });
        assert_eq!(
            encode(&frame, Dialect::Current),
            r#"{"success":true,"message":null,"error":false,"message_type":"relay_response"}"#
        );
        assert_eq!(
            encode(&frame, Dialect::Legacy),
            r#"{"success":true,"message":null,"error":false,"message_type":"server_response"}"#
        );
    }

    #[test]
    fn peer_shape_is_the_same_in_both_dialects() {
        let expected = format!(
            r#"{{"source_uuid":"{A}","source_name":"host-a","peer_uuid":"{B}","description_type":"offer","description":"v=0\r\n\"quoted\"","error":null,"message_type":"peer_connection"}}"#
        );
        let frame = Frame::Peer(peer());
        assert_eq!(encode(&frame, Dialect::Current), expected);
        assert_eq!(encode(&frame, Dialect::Legacy), expected);
    }

    #[test]
    fn peer_encoding_matches_serde_json_for_any_text() {
        #[derive(Serialize)]
        struct Reference<'a> {
            source_uuid: uuid::fmt::Hyphenated,
            source_name: &'a str,
            peer_uuid: uuid::fmt::Hyphenated,
            description_type: &'a str,
            description: &'a str,
            error: Option<&'a str>,
            message_type: &'static str,
        }
        let texts = [
            "",
            "plain",
            "v=0\r\no=- 46117 2 IN IP4 127.0.0.1\r\n",
            "\"quoted\" and \\ back",
            "tab\there, nul \u{0} and \u{1f}",
            "ünïcødé ✓ \u{7f} \u{10ffff}",
        ];
        let (a, b) = (A.parse().unwrap(), B.parse().unwrap());
        for text in texts {
            for error in [None, Some(text)] {
                let expected = serde_json::to_string(&Reference {
                    source_uuid: Uuid::hyphenated(a),
                    source_name: text,
                    peer_uuid: Uuid::hyphenated(b),
                    description_type: "offer",
                    description: text,
                    error,
                    message_type: "peer_connection",
                })
                .unwrap();
                assert_eq!(encode_peer(a, text, b, "offer", text, error), expected);
            }
        }
    }

    #[test]
    fn round_trips() {
        let frames = [
            Frame::Registration(Registration {
                name: "ünïcode name".into(),
                uuid: A.parse().unwrap(),
            }),
            Frame::Response(RelayResponse {
                success: false,
                message: Some("no".into()),
                error: true,
            }),
            Frame::Peer(peer()),
            Frame::Peer(PeerConnection {
                error: Some("Cannot forward".into()),
                ..peer()
            }),
        ];
        for dialect in [Dialect::Current, Dialect::Legacy] {
            for frame in &frames {
                let text = encode(frame, dialect);
                assert_eq!(&decode(&text, dialect).unwrap(), frame, "{text}");
            }
        }
    }

    #[test]
    fn python_spacing_and_uppercase_uuids_decode() {
        // json.dumps puts a space after separators; uuid.UUID accepts any case.
        let text = format!(
            r#"{{"source_uuid": "{}", "source_name": "b", "peer_uuid": "{B}", "description_type": "answer", "description": "x", "error": null, "message_type": "peer_connection"}}"#,
            A.to_uppercase()
        );
        let Frame::Peer(p) = decode(&text, Dialect::Current).unwrap() else {
            panic!("not a peer frame");
        };
        assert_eq!(p.source_uuid.to_string(), A);
        assert_eq!(p.description_type, "answer");
    }

    #[test]
    fn defaults_fill_missing_optional_keys() {
        let r = decode(r#"{"message_type":"relay_response"}"#, Dialect::Current).unwrap();
        assert_eq!(
            r,
            Frame::Response(RelayResponse {
                success: true,
                message: None,
                error: false
            })
        );
        let text = format!(
            r#"{{"source_uuid":"{A}","source_name":"a","peer_uuid":"{B}","description_type":"offer","description":"d","message_type":"peer_connection"}}"#
        );
        assert!(matches!(decode(&text, Dialect::Current), Ok(Frame::Peer(p)) if p.error.is_none()));
    }

    #[test]
    fn rejects_bad_frames_without_panicking() {
        let peer_ok = encode(&Frame::Peer(peer()), Dialect::Current);
        let cases: Vec<(String, DecodeError)> = vec![
            ("".into(), DecodeError::Json(String::new())),
            ("not json".into(), DecodeError::Json(String::new())),
            ("[1,2]".into(), DecodeError::Json(String::new())),
            (
                peer_ok[..peer_ok.len() / 2].into(),
                DecodeError::Json(String::new()),
            ),
            ("{}".into(), DecodeError::MissingType),
            (
                r#"{"message_type":"relay_registration","name":"a","uuid":"x"}"#.into(),
                DecodeError::BadUuid("uuid"),
            ),
            (
                r#"{"message_type":"relay_registration","name":"a"}"#.into(),
                DecodeError::MissingKey("uuid"),
            ),
            (
                format!(r#"{{"message_type":"relay_registration","name":null,"uuid":"{A}"}}"#),
                DecodeError::NullKey("name"),
            ),
            (
                r#"{"message_type":"server_response"}"#.into(),
                DecodeError::UnknownType("server_response".into(), Dialect::Current),
            ),
            (
                r#"{"message_type":"relay_response","extra":1}"#.into(),
                DecodeError::Json(String::new()),
            ),
            (
                r#"{"message_type":"relay_response","name":"a"}"#.into(),
                DecodeError::UnexpectedKey("name", "relay response"),
            ),
            (
                r#"{"message_type":"relay_response","error":"text"}"#.into(),
                DecodeError::BadErrorType("relay response"),
            ),
            (
                r#"{"message_type":"relay_response","success":"yes"}"#.into(),
                DecodeError::Json(String::new()),
            ),
            (
                peer_ok.replace(r#""error":null"#, r#""error":true"#),
                DecodeError::BadErrorType("peer connection"),
            ),
            (
                peer_ok.replace(r#""description":"#, r#""success":true,"description":"#),
                DecodeError::UnexpectedKey("success", "peer connection"),
            ),
            (
                peer_ok.replace(r#""description":"v=0\r\n\"quoted\"","#, ""),
                DecodeError::MissingKey("description"),
            ),
            (
                peer_ok.replace(r#""source_name":"host-a""#, r#""source_name":7"#),
                DecodeError::Json(String::new()),
            ),
            (
                peer_ok.replace(A, "1e569226-4748"),
                DecodeError::BadUuid("source_uuid"),
            ),
        ];
        for (text, expected) in cases {
            let got = decode(&text, Dialect::Current).expect_err(&text);
            match expected {
                // serde's own wording is not ours to pin down.
                DecodeError::Json(_) => {
                    assert!(matches!(got, DecodeError::Json(_)), "{text}: {got}")
                }
                other => assert_eq!(got, other, "{text}"),
            }
        }
    }
}
