//! `extra_hosts`: host names added to the container's `/etc/hosts`, each `NAME:ADDRESS` with an
//! RFC 1123 host name and an IPv4 or IPv6 address or Docker's `host-gateway`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::super::{ExtraHost, HostAddress, HOST_GATEWAY};
use super::checker::{k, Checker};

/// Longest host name (RFC 1123, as DNS: 253 characters without the trailing dot).
const MAX_NAME: usize = 253;

/// Longest label of a host name.
const MAX_LABEL: usize = 63;

/// `extra_hosts`: every entry that is valid; each invalid one (and each name given twice) is a
/// problem at its index.
pub(super) fn extra_hosts(c: &mut Checker<'_>, raw: &[String]) -> Vec<ExtraHost> {
    let mut out = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, entry) in raw.iter().enumerate() {
        let key = k("extra_hosts").index(i);
        match parse_extra_host(entry) {
            Ok(host) => {
                let lower = host.name.to_ascii_lowercase();
                if let Some(first) = seen.insert(lower, i) {
                    c.add(
                        &key,
                        format!(
                            "{entry:?}: the name {:?} is already given in extra_hosts[{first}]; give each name once",
                            host.name
                        ),
                    );
                } else {
                    out.push(host);
                }
            }
            Err(e) => c.add(&key, e.to_string()),
        }
    }
    out
}

/// Why an `extra_hosts` entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ExtraHostError {
    /// No `:` between a name and an address.
    #[error("{0:?} is not NAME:ADDRESS, e.g. \"tfserver:host-gateway\" or \"dut:10.0.0.5\"")]
    Shape(String),
    /// The name is not an RFC 1123 host name.
    #[error("{0:?}: {1:?} is not a host name: {2}")]
    Name(String, String, &'static str),
    /// The address is neither an IP address nor `host-gateway`.
    #[error("{0:?}: {1:?} is not an IPv4 or IPv6 address nor \"host-gateway\"")]
    Address(String, String),
}

/// Parses one `extra_hosts` entry: the name before the first `:`, the address after it (an
/// IPv6 address with or without brackets).
pub(crate) fn parse_extra_host(entry: &str) -> Result<ExtraHost, ExtraHostError> {
    let Some((name, addr)) = entry.split_once(':') else {
        return Err(ExtraHostError::Shape(entry.to_owned()));
    };
    if name.is_empty() || addr.is_empty() {
        return Err(ExtraHostError::Shape(entry.to_owned()));
    }
    if let Err(why) = check_host_name(name) {
        return Err(ExtraHostError::Name(entry.to_owned(), name.to_owned(), why));
    }
    let address = if addr == HOST_GATEWAY {
        HostAddress::HostGateway
    } else {
        let bare = addr
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr);
        match bare.parse::<IpAddr>() {
            Ok(ip) if bare == addr || ip.is_ipv6() => HostAddress::Ip(ip),
            _ => return Err(ExtraHostError::Address(entry.to_owned(), addr.to_owned())),
        }
    };
    Ok(ExtraHost {
        name: name.to_owned(),
        address,
    })
}

/// RFC 1123 host name rules: dot-separated labels of 1 to 63 letters, digits and hyphens, not
/// starting or ending with a hyphen; at most 253 characters in all.
pub(crate) fn check_host_name(name: &str) -> Result<(), &'static str> {
    if name.len() > MAX_NAME {
        return Err("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("an empty label (a leading, trailing or double dot)");
        }
        if label.len() > MAX_LABEL {
            return Err("a label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("only letters, digits, hyphens and dots are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with a hyphen");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(entry: &str) -> String {
        parse_extra_host(entry).unwrap().to_string()
    }

    fn msg(entry: &str) -> String {
        parse_extra_host(entry).unwrap_err().to_string()
    }

    #[test]
    fn accepted_forms_render_as_docker_takes_them() {
        assert_eq!(ok("tfserver:host-gateway"), "tfserver:host-gateway");
        assert_eq!(ok("name:1.2.3.4"), "name:1.2.3.4");
        assert_eq!(ok("lab.example.com:10.0.0.5"), "lab.example.com:10.0.0.5");
        assert_eq!(ok("v6:2001:db8::5"), "v6:2001:db8::5");
        assert_eq!(ok("v6:[2001:db8::5]"), "v6:2001:db8::5", "brackets dropped");
        assert_eq!(ok("v6:::1"), "v6:::1");
        assert_eq!(ok("1dut-2:127.0.0.1"), "1dut-2:127.0.0.1");
        let max_label = format!("{}:1.2.3.4", "a".repeat(63));
        assert_eq!(ok(&max_label), max_label);
    }

    #[test]
    fn refused_forms_name_the_entry_and_why() {
        let shape = "is not NAME:ADDRESS, e.g. \"tfserver:host-gateway\" or \"dut:10.0.0.5\"";
        assert_eq!(msg("tfserver"), format!("\"tfserver\" {shape}"));
        assert_eq!(msg(":1.2.3.4"), format!("\":1.2.3.4\" {shape}"));
        assert_eq!(msg("tfserver:"), format!("\"tfserver:\" {shape}"));
        assert_eq!(
            msg("tf_server:1.2.3.4"),
            "\"tf_server:1.2.3.4\": \"tf_server\" is not a host name: only letters, digits, hyphens and dots are allowed"
        );
        assert_eq!(
            msg("-tf:1.2.3.4"),
            "\"-tf:1.2.3.4\": \"-tf\" is not a host name: a label starts or ends with a hyphen"
        );
        assert!(msg("a..b:1.2.3.4").contains("an empty label"));
        assert!(msg("a.:1.2.3.4").contains("an empty label"));
        assert!(msg(&format!("{}:1.2.3.4", "a".repeat(64))).contains("longer than 63"));
        let long = vec!["a".repeat(60); 5].join(".");
        assert!(msg(&format!("{long}:1.2.3.4")).contains("longer than 253"));
        assert_eq!(
            msg("tfserver:host_gateway"),
            "\"tfserver:host_gateway\": \"host_gateway\" is not an IPv4 or IPv6 address nor \"host-gateway\""
        );
        for bad in [
            "a:1.2.3",
            "a:1.2.3.256",
            "a:[1.2.3.4]",
            "a:gerät",
            "a:fe80::1%eth0",
        ] {
            assert!(msg(bad).contains("is not an IPv4 or IPv6 address"), "{bad}");
        }
    }
}
