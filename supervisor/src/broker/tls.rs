//! TLS on the managed broker's agent listener (`labvisor supervise --agent-tls`).
//!
//! Without it, agents log in to the managed broker in clear text on the labvisor bridge: any
//! container that can overhear the bridge (ARP spoofing with `NET_RAW`) reads the CONNECT
//! packets, with each SUT's user and password. With it, the listener on the bridge's gateway
//! speaks only TLS, with certificates the supervisor makes itself, so there is nothing to set
//! up by hand:
//!
//! - a CA of its own, made once and kept in `<state dir>/ca/` (`ca.key` 0600 and `ca.crt`, in
//!   a 0700 directory that stays the supervisor's user's, never handed to the broker's user);
//! - a server certificate for the gateway's address (an IP SAN: what the agents connect to and
//!   check), signed by that CA, made again with a new key at every start (so a new gateway
//!   address is always covered), as `server.crt` and `server.key` (0600) in the state
//!   directory, which mosquitto reads;
//! - the agents get the CA certificate as PEM text (`LABVISOR_MQTT_CA_PEM`) and the
//!   `mqtts://<gateway>:<port>` URL. The CA is kept across restarts, so adopted agents keep
//!   trusting the broker and their containers are not recreated.
//!
//! The plain listener stays on loopback only, for the supervisor and local tools.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::state::write_private;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The directory of the CA in the state directory: private to the supervisor's user.
pub const CA_DIR: &str = "ca";
/// The CA's private key, in [`CA_DIR`].
pub const CA_KEY: &str = "ca.key";
/// The CA's certificate, in [`CA_DIR`]: what the agents trust.
pub const CA_CERT: &str = "ca.crt";
/// The agent listener's certificate, in the state directory.
pub const SERVER_CERT: &str = "server.crt";
/// The agent listener's private key, in the state directory (0600, read by mosquitto).
pub const SERVER_KEY: &str = "server.key";

/// How long the CA is valid from its making.
const CA_DAYS: i64 = 20 * 365;
/// How long a server certificate is valid from its making (it is made at every start).
const SERVER_DAYS: i64 = 5 * 365;

/// Why the agent listener's certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or directory cannot be read or written.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key or certificate cannot be made or read.
    #[error("cannot make the agent listener's certificates: {0}")]
    Cert(#[from] rcgen::Error),
    /// The CA in the state directory does not make certificates that verify.
    #[error(
        "the CA in {dir} does not sign a server certificate that verifies for {addr} ({reason}); \
         remove that directory to make a new CA (the agents' containers are then recreated \
         with it)"
    )]
    Unusable {
        /// The CA directory.
        dir: PathBuf,
        /// The listener's address.
        addr: IpAddr,
        /// What the verification said (in the message, so not a `#[source]`).
        reason: VerifyError,
    },
}

/// The agent listener's TLS files, ready for mosquitto, and the CA the agents get.
#[derive(Debug, Clone)]
pub struct AgentTls {
    /// The CA certificate, PEM: given to the agents (`LABVISOR_MQTT_CA_PEM`).
    pub ca_pem: String,
    /// The CA certificate file.
    pub ca_file: PathBuf,
    /// The server certificate file (`certfile`).
    pub cert_file: PathBuf,
    /// The server key file (`keyfile`).
    pub key_file: PathBuf,
}

impl AgentTls {
    /// Makes sure of the CA in `state_dir` (made the first time), and makes a server
    /// certificate for `addr` signed by it; checks that it verifies for `addr` against the CA
    /// with the agents' own TLS stack (rustls, webpki) before mosquitto is given it.
    pub fn prepare(state_dir: &Path, addr: IpAddr) -> Result<AgentTls, TlsError> {
        let ca_dir = state_dir.join(CA_DIR);
        std::fs::create_dir_all(&ca_dir).map_err(io(&ca_dir))?;
        set_mode(&ca_dir, 0o700)?;
        let (ca_key, ca_pem) = load_or_make_ca(&ca_dir)?;
        let issuer = Issuer::new(ca_params(), ca_key);

        let key = KeyPair::generate()?;
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "labvisor");
            dn.push(DnType::CommonName, "labvisor managed broker");
            dn
        };
        params.subject_alt_names = vec![SanType::IpAddress(addr)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(SERVER_DAYS);
        let cert = params.signed_by(&key, &issuer)?;
        verify(&ca_pem, cert.der(), addr).map_err(|reason| TlsError::Unusable {
            dir: ca_dir.clone(),
            addr,
            reason,
        })?;

        let cert_file = state_dir.join(SERVER_CERT);
        let key_file = state_dir.join(SERVER_KEY);
        write_file(&key_file, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_file, cert.pem().as_bytes(), 0o644)?;
        Ok(AgentTls {
            ca_pem,
            ca_file: ca_dir.join(CA_CERT),
            cert_file,
            key_file,
        })
    }

    /// The lines of mosquitto's config that make the listener above them speak TLS with the
    /// server certificate (no client certificates: agents log in with their password).
    pub fn listener_lines(&self) -> String {
        format!(
            "certfile {}\nkeyfile {}\n",
            self.cert_file.display(),
            self.key_file.display()
        )
    }
}

/// The CA's fixed parameters: its certificate is made from them once, and every server
/// certificate names it as issuer through them (name, key identifier method, key usages).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "labvisor");
        dn.push(DnType::CommonName, "labvisor managed broker CA");
        dn
    };
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// The CA's key and certificate (PEM): read from `dir`, or made and written there when either
/// is missing.
fn load_or_make_ca(dir: &Path) -> Result<(KeyPair, String), TlsError> {
    let (key_path, cert_path) = (dir.join(CA_KEY), dir.join(CA_CERT));
    if let (Ok(key), Ok(cert)) = (
        std::fs::read_to_string(&key_path),
        std::fs::read_to_string(&cert_path),
    ) {
        set_mode(&key_path, 0o600)?;
        return Ok((KeyPair::from_pem(&key)?, cert));
    }
    let key = KeyPair::generate()?;
    let now = time::OffsetDateTime::now_utc();
    let mut params = ca_params();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(CA_DAYS);
    let ca = CertifiedIssuer::self_signed(params, key)?;
    let pem = ca.pem();
    write_file(&key_path, ca.key().serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, pem.as_bytes(), 0o644)?;
    let key = KeyPair::from_pem(&ca.key().serialize_pem())?;
    Ok((key, pem))
}

/// Why a server certificate does not verify against the CA (see [`TlsError::Unusable`]).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The CA certificate is not PEM.
    #[error(transparent)]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// The CA certificate, or the server certificate against it, is refused.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// No verifier can be made from the CA.
    #[error(transparent)]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Verifies `cert` for `addr` against the CA in `ca_pem`, as an agent would.
fn verify(
    ca_pem: &str,
    cert: &rustls_pki_types::CertificateDer<'_>,
    addr: IpAddr,
) -> Result<(), VerifyError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()?;
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        cert,
        &[],
        &rustls_pki_types::ServerName::IpAddress(addr.into()),
        &[],
        rustls_pki_types::UnixTime::now(),
    )?;
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_path_buf();
    move |source| TlsError::Io { path, source }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), TlsError> {
    super::state::set_mode(path, mode).map_err(io(path))
}

/// Writes `bytes` to `path`, replaced whole, created with `mode` ([`write_private`]).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    write_private(path, bytes, mode).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ca_is_made_once_private_and_signs_for_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let a: IpAddr = "172.30.0.1".parse().unwrap();
        let first = AgentTls::prepare(dir.path(), a).unwrap();
        let ca_dir = dir.path().join(CA_DIR);
        assert_eq!(mode(&ca_dir), 0o700);
        assert_eq!(mode(&ca_dir.join(CA_KEY)), 0o600);
        assert_eq!(mode(&first.key_file), 0o600);
        assert!(first.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let server1 = std::fs::read(&first.cert_file).unwrap();
        verify(
            &first.ca_pem,
            &pem_der(&String::from_utf8(server1.clone()).unwrap()),
            a,
        )
        .unwrap();

        // Another start, on another gateway: the same CA, a new server certificate for the
        // new address, which the old one's address does not pass.
        let b: IpAddr = "10.99.0.1".parse().unwrap();
        let second = AgentTls::prepare(dir.path(), b).unwrap();
        assert_eq!(second.ca_pem, first.ca_pem, "the CA is kept");
        let server2 = std::fs::read_to_string(&second.cert_file).unwrap();
        assert_ne!(server2.as_bytes(), &server1[..]);
        verify(&second.ca_pem, &pem_der(&server2), b).unwrap();
        let wrong = verify(&second.ca_pem, &pem_der(&server2), a)
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("not valid for name"), "{wrong}");
    }

    #[test]
    fn a_ca_certificate_that_does_not_match_its_key_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let a: IpAddr = "172.30.0.1".parse().unwrap();
        AgentTls::prepare(dir.path(), a).unwrap();
        // Someone else's CA certificate beside our key.
        let other = CertifiedIssuer::self_signed(ca_params(), KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        std::fs::write(dir.path().join(CA_DIR).join(CA_CERT), other).unwrap();
        let e = AgentTls::prepare(dir.path(), a).unwrap_err().to_string();
        assert!(e.contains("remove that directory"), "{e}");
    }

    fn pem_der(pem: &str) -> rustls_pki_types::CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }
}
