//! Broker URLs (`mqtt://[user[:password]@]host[:port]`, `mqtts://…`), parsed with the `url`
//! crate (the WHATWG parser already in the graph) and checked against what a broker address may
//! hold: no path, query or fragment, a port in 1..=65535, well-formed percent escapes.

use std::borrow::Cow;
use std::ops::Range;

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
/// allowed; an IPv6 host may carry its zone (`[fe80::1%eth0]`).
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
    let (unzoned, zone) = without_zone(text);
    let url = Url::parse(&unzoned).map_err(|e| refused(text, e))?;
    // `url` reads an empty port (`host:`) as no port; it is a mistake, as it always was here.
    if rest.trim_end_matches('/').ends_with(':') {
        return Err(bad_port(text));
    }
    let suffix = &url[Position::BeforePath..];
    if !(suffix.is_empty() || suffix == "/") {
        return Err(UrlError::UnexpectedSuffix(suffix.to_owned()));
    }
    let host = match url.host() {
        Some(Host::Domain(d)) if !d.is_empty() => d.to_owned(),
        Some(Host::Ipv4(ip)) => ip.to_string(),
        Some(Host::Ipv6(ip)) => match zone {
            Some(zone) => format!("{ip}%{zone}"),
            None => ip.to_string(),
        },
        _ => return Err(UrlError::MissingHost(text.to_owned())),
    };
    let port = match url.port() {
        None => default_port,
        Some(0) => return Err(bad_port(text)),
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

/// `text` without the zone of its bracketed IPv6 host (`%eth0` in `[fe80::1%eth0]`), and that
/// zone. `url` refuses zones; getaddrinfo, which resolves the host, understands them.
fn without_zone(text: &str) -> (Cow<'_, str>, Option<&str>) {
    let Range { start: host, end } = host_span(text);
    let bracketed = text[host..end]
        .strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .map(|(inside, _)| inside);
    match bracketed.and_then(|inside| inside.split_once('%')) {
        Some((addr, zone)) if !zone.is_empty() => {
            let after = host + 1 + addr.len() + 1 + zone.len();
            (
                format!("{}{}", &text[..host + 1 + addr.len()], &text[after..]).into(),
                Some(zone),
            )
        }
        _ => (text.into(), None),
    }
}

/// Where the host and port of `text` are: after `scheme://` and any `user[:password]@`, up to
/// the path, query or fragment.
fn host_span(text: &str) -> Range<usize> {
    let start = text.find("://").map_or(0, |i| i + 3);
    let end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    let host = text[start..end].rfind('@').map_or(start, |i| start + i + 1);
    host..end
}

/// [`UrlError::InvalidPort`] with the port as written in `text` (`x` in `mqtt://h:x`): what
/// follows the last `:`, or the IPv6 host's `]` (less its `:`). Not the whole URL: it may hold
/// a password.
fn bad_port(text: &str) -> UrlError {
    let host_port = &text[host_span(text)];
    let port = match host_port.strip_prefix('[') {
        Some(v6) => v6
            .split_once(']')
            .map_or("", |(_, after)| after.strip_prefix(':').unwrap_or(after)),
        None => host_port.rsplit_once(':').map_or("", |(_, port)| port),
    };
    UrlError::InvalidPort(port.to_owned())
}

/// Maps the `url` crate's refusal to ours.
fn refused(text: &str, e: url::ParseError) -> UrlError {
    use url::ParseError as P;
    match e {
        P::EmptyHost => UrlError::MissingHost(text.to_owned()),
        P::InvalidPort => bad_port(text),
        P::InvalidIpv6Address => match text.split_once(']') {
            None => UrlError::UnclosedBracket(text.to_owned()),
            // `[::1]x`: the address is fine, what follows it is no `:port`.
            Some((_, after)) if !after.is_empty() && !after.starts_with([':', '/']) => {
                bad_port(text)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LinkOptions;

    #[test]
    fn url_plain_with_default_port() {
        let p = parse_url("mqtt://broker.lab").unwrap();
        assert_eq!(
            p,
            ParsedUrl {
                tls: false,
                host: "broker.lab".into(),
                port: 1883,
                username: None,
                password: None
            }
        );
    }

    #[test]
    fn url_tls_with_credentials_and_port() {
        let p = parse_url("mqtts://agent:s%3Acr%40t@10.0.0.1:9883/").unwrap();
        assert!(p.tls);
        assert_eq!(p.host, "10.0.0.1");
        assert_eq!(p.port, 9883);
        assert_eq!(p.username.as_deref(), Some("agent"));
        assert_eq!(p.password.as_deref(), Some("s:cr@t"));
        assert_eq!(parse_url("mqtts://h").unwrap().port, 8883);
    }

    #[test]
    fn url_ipv6_and_user_only() {
        let p = parse_url("mqtt://user@[::1]:1884").unwrap();
        assert_eq!(p.host, "::1");
        assert_eq!(p.port, 1884);
        assert_eq!(p.username.as_deref(), Some("user"));
        assert_eq!(p.password, None);
        assert_eq!(parse_url("mqtt://[fe80::2]").unwrap().port, 1883);
        let o = LinkOptions::from_url("mqtt://[::1]:1884", "c").unwrap();
        assert_eq!(o.broker(), "[::1]:1884");
        assert_eq!(o.client_id, "c");
    }

    #[test]
    fn url_errors() {
        use UrlError::*;
        assert!(matches!(parse_url("broker:1883"), Err(MissingScheme(_))));
        assert!(matches!(parse_url("http://h"), Err(UnsupportedScheme(s)) if s == "http"));
        assert!(matches!(parse_url("mqtt://"), Err(MissingHost(_))));
        assert!(matches!(parse_url("mqtt://:1883"), Err(MissingHost(_))));
        assert!(matches!(parse_url("mqtt://h:0"), Err(InvalidPort(_))));
        assert!(matches!(parse_url("mqtt://h:70000"), Err(InvalidPort(_))));
        assert!(matches!(parse_url("mqtt://h:x"), Err(InvalidPort(_))));
        assert!(matches!(
            parse_url("mqtt://h/topic"),
            Err(UnexpectedSuffix(_))
        ));
        assert!(matches!(
            parse_url("mqtt://h?client_id=x"),
            Err(UnexpectedSuffix(_))
        ));
        assert!(matches!(parse_url("mqtt://u:%zz@h"), Err(InvalidEscape)));
        assert!(matches!(parse_url("mqtt://[::1"), Err(UnclosedBracket(_))));
        assert!(matches!(parse_url("mqtt://[::1]x"), Err(InvalidPort(_))));
        // Errors read as sentences naming the culprit.
        let e = parse_url("http://h").unwrap_err().to_string();
        assert!(e.contains("\"http\"") && e.contains("mqtts://"), "{e}");
    }

    #[test]
    fn url_edge_cases_keep_their_meaning() {
        use UrlError::*;
        assert!(matches!(parse_url("mqtt://h:"), Err(InvalidPort(_))));
        assert!(matches!(parse_url("mqtt://[::1]:"), Err(InvalidPort(_))));
        assert!(matches!(parse_url("mqtt://h?"), Err(UnexpectedSuffix(s)) if s == "?"));
        assert!(matches!(parse_url("mqtt://h#f"), Err(UnexpectedSuffix(s)) if s == "#f"));
        assert!(matches!(parse_url("mqtt://a b"), Err(Invalid { .. })));
        let p = parse_url("MQTT://User:p@ss@Host.lab:01883").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("Host.lab", 1883));
        assert_eq!(p.username.as_deref(), Some("User"));
        assert_eq!(p.password.as_deref(), Some("p@ss"));
        let p = parse_url("tcp://:secret@h").unwrap();
        assert_eq!((p.username, p.password.as_deref()), (None, Some("secret")));
        assert!(parse_url("ssl://h").unwrap().tls);
    }

    /// A bad port is named as written (not the whole URL, which may hold a password).
    #[test]
    fn a_bad_port_is_named_as_written() {
        let port = |u: &str| match parse_url(u) {
            Err(UrlError::InvalidPort(p)) => p,
            other => panic!("{u}: {other:?}"),
        };
        assert_eq!(port("mqtt://u:pw@h:x"), "x");
        assert_eq!(port("mqtt://h:70000/"), "70000");
        assert_eq!(port("mqtt://h:0"), "0");
        assert_eq!(port("mqtt://h:"), "");
        assert_eq!(port("mqtt://[::1]:x"), "x");
        assert_eq!(port("mqtt://[::1]x"), "x");
        assert_eq!(port("mqtt://[fe80::1%eth0]:99999"), "99999");
        assert_eq!(
            UrlError::InvalidPort("x".into()).to_string(),
            "broker URL port \"x\" is not a number between 1 and 65535"
        );
    }

    /// A link-local broker with its interface (`[fe80::1%eth0]`): the hand-written parser before
    /// `url` took the zone as part of the host, and getaddrinfo (through tokio's lookup) resolves
    /// it. The WHATWG parser refuses zones, so they are carried around it.
    #[test]
    fn an_ipv6_zone_stays_on_the_host() {
        let p = parse_url("mqtt://u:p%25@[fe80::1%eth0]:1884/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("fe80::1%eth0", 1884));
        assert_eq!(p.password.as_deref(), Some("p%"));
        assert_eq!(
            parse_url("mqtts://[fe80::2%br-lab]").unwrap().host,
            "fe80::2%br-lab"
        );
        let o = LinkOptions::from_url("mqtt://[fe80::1%eth0]", "c").unwrap();
        assert_eq!(o.broker(), "[fe80::1%eth0]:1883");
        // Still refused: no address before the zone, or something that is no port after it.
        assert!(parse_url("mqtt://[zz%eth0]").is_err());
        assert!(parse_url("mqtt://[fe80::1%eth0]x").is_err());
        // A bracket that holds no IPv6 address is not called a bad port.
        assert!(matches!(
            parse_url("mqtt://[zz]"),
            Err(UrlError::Invalid { .. })
        ));
    }
}
