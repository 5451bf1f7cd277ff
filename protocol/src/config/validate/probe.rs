//! `[probe]`: the device's probe, exactly one of a URL (`tcp://host:port`, `http(s)://…`,
//! parsed with the `url` crate) and an exec probe's `command`.

use url::Url;

use super::super::raw::RawProbe;
use super::super::{Probe, ProbeCheck, ProbeTarget, MIN_PROBE_INTERVAL};
use super::checker::{kk, secs, Checker};

/// `[probe]`: `None` when neither or both of `url` and `command` are given, or the one given
/// is wrong (the problem is reported).
pub(super) fn probe(c: &mut Checker<'_>, p: &RawProbe) -> Option<Probe> {
    let interval = c.duration(
        kk("probe", "interval"),
        p.interval.as_ref(),
        secs(60),
        false,
    );
    c.at_least(
        kk("probe", "interval"),
        p.interval.is_some(),
        interval,
        MIN_PROBE_INTERVAL,
        "each probe opens a connection to the device",
    );
    let timeout = c.duration(kk("probe", "timeout"), p.timeout.as_ref(), secs(10), false);
    c.order(
        kk("probe", "timeout"),
        timeout >= interval,
        timeout,
        "shorter than probe.interval",
        interval,
        "",
    );
    let check = check(c, p)?;
    Some(Probe {
        check,
        interval,
        timeout,
    })
}

/// What the probe does: exactly one of `url` and `command`; `None` (reported) otherwise.
fn check(c: &mut Checker<'_>, p: &RawProbe) -> Option<ProbeCheck> {
    match (p.url.as_deref(), p.command.as_deref()) {
        (None, None) => {
            c.add(
                &kk("probe", "url"),
                "missing: give url = \"tcp://host:port\" or \"http://…\" (reachability), or \
                 command = [\"sh\", \"-c\", \"…\"] (an exec probe run inside the container)",
            );
            None
        }
        (Some(_), Some(_)) => {
            c.add(
                &kk("probe", "command"),
                "give either url or command in [probe], not both",
            );
            None
        }
        (Some(u), None) => match parse_probe_url(u) {
            Ok(t) => Some(ProbeCheck::Url(t)),
            Err(e) => {
                c.add(&kk("probe", "url"), e.to_string());
                None
            }
        },
        (None, Some(cmd)) => exec_command(c, cmd).map(ProbeCheck::Command),
    }
}

/// `probe.command`: a non-empty argv with a program, no NUL anywhere.
fn exec_command(c: &mut Checker<'_>, cmd: &[String]) -> Option<Vec<String>> {
    let key = kk("probe", "command");
    let mut ok = true;
    match cmd.first() {
        None => {
            c.add(
                &key,
                "must not be empty: give the argv of the check, e.g. [\"sh\", \"-c\", \"…\"]",
            );
            ok = false;
        }
        Some(p) if p.is_empty() => {
            c.add(&key.index(0), "the program must not be empty");
            ok = false;
        }
        Some(_) => {}
    }
    for (i, a) in cmd.iter().enumerate() {
        if a.contains('\0') {
            c.add(&key.index(i), "must not contain a NUL character");
            ok = false;
        }
    }
    ok.then(|| cmd.to_vec())
}

/// Why a `probe.url` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProbeUrlError {
    /// Whitespace or control characters.
    #[error("{0:?} must not contain whitespace")]
    Whitespace(String),
    /// `tcp://` without exactly a host and a port from 1 to 65535.
    #[error("{0:?} is not tcp://host:port with a port from 1 to 65535")]
    Tcp(String),
    /// `http(s)://` without a host.
    #[error("{0:?} has no host")]
    NoHost(String),
    /// `http(s)://` that the URL parser refuses (a port over 65535, a bad IPv6 address...).
    #[error("{0:?} is not a valid URL: {1}")]
    Invalid(String, url::ParseError),
    /// Another scheme, or none.
    #[error("{0:?} must start with tcp://, http:// or https://")]
    Scheme(String),
}

/// Parses `probe.url`. `tcp://host:port` must be exactly that (no user, path, query or
/// fragment); the host is kept as written, an IPv6 address in its brackets (or without them,
/// or with a zone: [`tcp_ipv6_literal`]). An HTTP(S) URL needs a host and is kept as written.
pub(crate) fn parse_probe_url(u: &str) -> Result<ProbeTarget, ProbeUrlError> {
    if u.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        return Err(ProbeUrlError::Whitespace(u.to_owned()));
    }
    match u.split_once("://") {
        Some(("tcp", _)) => tcp_target(u).ok_or_else(|| ProbeUrlError::Tcp(u.to_owned())),
        // `url` would read `http:///x` as host `x`: the authority must be there as written.
        Some(("http" | "https", rest)) if rest.is_empty() || rest.starts_with('/') => {
            Err(ProbeUrlError::NoHost(u.to_owned()))
        }
        Some(("http" | "https", _)) => match Url::parse(u) {
            Ok(parsed) if parsed.host_str().is_some_and(|h| !h.is_empty()) => {
                Ok(ProbeTarget::Http { url: u.to_owned() })
            }
            Ok(_) => Err(ProbeUrlError::NoHost(u.to_owned())),
            Err(e) => Err(ProbeUrlError::Invalid(u.to_owned(), e)),
        },
        _ => Err(ProbeUrlError::Scheme(u.to_owned())),
    }
}

/// `tcp://host:port` as a target; `None` if it is anything more or less.
fn tcp_target(u: &str) -> Option<ProbeTarget> {
    tcp_url(u).or_else(|| tcp_ipv6_literal(u))
}

/// `tcp://host:port` as the `url` crate reads it.
fn tcp_url(u: &str) -> Option<ProbeTarget> {
    let parsed = Url::parse(u).ok()?;
    let plain = parsed.username().is_empty()
        && parsed.password().is_none()
        && parsed.path().is_empty()
        && parsed.query().is_none()
        && parsed.fragment().is_none();
    parsed.host_str().filter(|h| !h.is_empty())?;
    let port = parsed.port().filter(|p| *p != 0)?;
    // As written: `url` percent-encodes a non-ASCII opaque host.
    let (host, _) = u.strip_prefix("tcp://")?.rsplit_once(':')?;
    plain.then(|| ProbeTarget::Tcp {
        host: host.to_owned(),
        port,
    })
}

/// `tcp://` with an IPv6 address the `url` crate refuses but the agent connects to: without
/// brackets (the last `:` starts the port) or with a zone (`fe80::1%eth0`). Such URLs were
/// accepted before `url` parsed them; the host is kept as written.
fn tcp_ipv6_literal(u: &str) -> Option<ProbeTarget> {
    let (host, port) = u.strip_prefix("tcp://")?.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let (addr, zone) = inner.split_once('%').unwrap_or((inner, "x"));
    let zone_ok = !zone.is_empty()
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    (zone_ok && addr.parse::<std::net::Ipv6Addr>().is_ok()).then(|| ProbeTarget::Tcp {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> ProbeTarget {
        ProbeTarget::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(parse_probe_url("tcp://dut:22"), Ok(tcp("dut", 22)));
        assert_eq!(
            parse_probe_url("tcp://10.0.0.5:22"),
            Ok(tcp("10.0.0.5", 22))
        );
        assert_eq!(parse_probe_url("tcp://[::1]:22"), Ok(tcp("[::1]", 22)));
        assert_eq!(
            parse_probe_url("tcp://Dut-01:65535"),
            Ok(tcp("Dut-01", 65535))
        );
        for http in [
            "http://dut/",
            "https://dut:8443/health?x=1",
            "http://10.0.0.5",
        ] {
            assert_eq!(
                parse_probe_url(http),
                Ok(ProbeTarget::Http { url: http.into() })
            );
        }
    }

    #[test]
    fn ipv6_addresses_the_url_crate_refuses_are_accepted_as_before() {
        // Unbracketed (the last `:` starts the port) and with a zone: accepted, the host kept
        // as written, before probe URLs were parsed with `url`.
        assert_eq!(parse_probe_url("tcp://::1:22"), Ok(tcp("::1", 22)));
        assert_eq!(
            parse_probe_url("tcp://2001:db8::5:2222"),
            Ok(tcp("2001:db8::5", 2222))
        );
        assert_eq!(
            parse_probe_url("tcp://fe80::1%eth0:22"),
            Ok(tcp("fe80::1%eth0", 22))
        );
        assert_eq!(
            parse_probe_url("tcp://[fe80::1%eth0]:22"),
            Ok(tcp("[fe80::1%eth0]", 22))
        );
        for bad in [
            "tcp://::1:0",
            "tcp://::1:x",
            "tcp://::1:+22",
            "tcp://fe80::1%:22",
        ] {
            assert!(parse_probe_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_tcp_host_is_kept_as_written_not_percent_encoded() {
        // The host is part of the config hash: `url`'s percent-encoding of an opaque host
        // would change it (and recreate the container) for a file accepted before.
        assert_eq!(parse_probe_url("tcp://gerät:22"), Ok(tcp("gerät", 22)));
    }

    #[test]
    fn refused_forms_keep_their_messages() {
        let msg = |u: &str| parse_probe_url(u).unwrap_err().to_string();
        for bad in [
            "tcp://rpi:0",
            "tcp://rpi",
            "tcp://:22",
            "tcp://rpi:70000",
            "tcp://rpi:22/x",
        ] {
            assert_eq!(
                msg(bad),
                format!("{bad:?} is not tcp://host:port with a port from 1 to 65535")
            );
        }
        assert_eq!(msg("http://"), "\"http://\" has no host");
        assert_eq!(msg("https:///x"), "\"https:///x\" has no host");
        assert_eq!(
            msg("ssh://dut"),
            "\"ssh://dut\" must start with tcp://, http:// or https://"
        );
        assert_eq!(
            msg("tcp://a b:1"),
            "\"tcp://a b:1\" must not contain whitespace"
        );
    }

    /// An HTTP URL the parser refuses says why, not that it has no host.
    #[test]
    fn an_invalid_http_url_names_the_parser_s_reason() {
        let msg = |u: &str| parse_probe_url(u).unwrap_err().to_string();
        assert_eq!(
            msg("http://h:99999/"),
            "\"http://h:99999/\" is not a valid URL: invalid port number"
        );
        assert_eq!(
            msg("http://[zz]/"),
            "\"http://[zz]/\" is not a valid URL: invalid IPv6 address"
        );
    }
}
