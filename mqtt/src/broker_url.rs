//! Broker URLs (`mqtt://[user[:password]@]host[:port]`, `mqtts://…`), parsed with the `url`
//! crate (the WHATWG parser already in the graph) and checked against what a broker address may
//! hold: no path, query or fragment, a port in 1..=65535, well-formed percent escapes.

use url::{Host, Position, Url};

use crate::error::UrlError;

/// Default MQTT port for `mqtt://`.
pub const DEFAULT_PORT: u16 = 1883;

/// Default MQTT port for `mqtts://`.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// The parts of a broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Parses a broker URL. Schemes `mqtt` and `tcp` are plain, `mqtts` and `ssl` TLS (any case);
/// user and password may be percent-encoded; IPv6 hosts go in brackets; a lone trailing `/` is
/// allowed.
pub(crate) fn parse_url(text: &str) -> Result<ParsedUrl, UrlError> {
    // `url` would read `broker:1883` as the scheme `broker`: insist on `scheme://` first.
    let (scheme, rest) = text
        .split_once("://")
        .ok_or_else(|| UrlError::MissingScheme(text.to_owned()))?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => (false, DEFAULT_PORT),
        "mqtts" | "ssl" => (true, DEFAULT_TLS_PORT),
        _ => return Err(UrlError::UnsupportedScheme(scheme.to_owned())),
    };
    let url = Url::parse(text).map_err(|e| refused(text, e))?;
    // `url` reads an empty port (`host:`) as no port; it is a mistake, as it always was here.
    if rest.trim_end_matches('/').ends_with(':') {
        return Err(UrlError::InvalidPort(text.to_owned()));
    }
    let suffix = &url[Position::BeforePath..];
    if !(suffix.is_empty() || suffix == "/") {
        return Err(UrlError::UnexpectedSuffix(suffix.to_owned()));
    }
    let host = match url.host() {
        Some(Host::Domain(d)) if !d.is_empty() => d.to_owned(),
        Some(Host::Ipv4(ip)) => ip.to_string(),
        Some(Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(UrlError::MissingHost(text.to_owned())),
    };
    let port = match url.port() {
        None => default_port,
        Some(0) => return Err(UrlError::InvalidPort(text.to_owned())),
        Some(n) => n,
    };
    let username = Some(decode(url.username())?).filter(|u| !u.is_empty());
    let password = url.password().map(decode).transpose()?;
    Ok(ParsedUrl {
        tls,
        host,
        port,
        username,
        password,
    })
}

/// Maps the `url` crate's refusal to ours.
fn refused(text: &str, e: url::ParseError) -> UrlError {
    use url::ParseError as P;
    match e {
        P::EmptyHost => UrlError::MissingHost(text.to_owned()),
        P::InvalidPort => UrlError::InvalidPort(text.to_owned()),
        P::InvalidIpv6Address => match text.split_once(']') {
            None => UrlError::UnclosedBracket(text.to_owned()),
            // `[::1]x`: the address is fine, what follows it is no `:port`.
            Some((_, after)) if !after.starts_with([':', '/']) => {
                UrlError::InvalidPort(text.to_owned())
            }
            Some(_) => invalid(text, e),
        },
        other => invalid(text, other),
    }
}

fn invalid(text: &str, e: url::ParseError) -> UrlError {
    UrlError::Invalid {
        url: text.to_owned(),
        reason: e.to_string(),
    }
}

/// Percent-decodes a user name or password. `url` keeps a malformed escape (`%zz`) as it is;
/// we refuse it, as a mistyped secret should not be sent literally.
fn decode(s: &str) -> Result<String, UrlError> {
    let well_formed = s
        .split('%')
        .skip(1)
        .all(|rest| rest.len() >= 2 && rest.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit));
    if !well_formed {
        return Err(UrlError::InvalidEscape);
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| UrlError::InvalidEscape)
}
