//! A test PKI made with openssl.

use crate::run_ok;
use std::path::Path;
use std::process::Command;

/// A test PKI made with openssl in `dir`: for each name in `cas` a self-signed CA (`<name>.crt`,
/// `<name>.key`), and `server.crt`/`server.key` signed by the first, with `subject_alt_name`
/// (e.g. `IP:127.0.0.1,DNS:localhost`). Files are world-readable: mosquitto started as root drops
/// to its own user before reading the key.
pub fn test_pki(dir: &Path, cas: &[&str], subject_alt_name: &str) {
    use std::os::unix::fs::PermissionsExt;
    let ossl = |args: &[&str]| {
        run_ok(Command::new("openssl").current_dir(dir).args(args));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in cas {
        let (key, crt, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN=labvisor test {ca}"),
        );
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
        ossl(&a);
    }
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=labvisor test server",
    ]);
    ossl(&a);
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName={subject_alt_name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    let (ca_crt, ca_key) = (format!("{}.crt", cas[0]), format!("{}.key", cas[0]));
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    for f in ["server.key", "server.crt"]
        .into_iter()
        .map(String::from)
        .chain(cas.iter().map(|c| format!("{c}.crt")))
    {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}
