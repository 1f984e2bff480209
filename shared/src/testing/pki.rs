//! Certificates for TLS tests, made by `/usr/bin/openssl` in a folder of the test's: a
//! CA, a server certificate for 127.0.0.1 and localhost signed by it, a client
//! certificate signed by it, and a client certificate of a CA nobody trusts. The same
//! steps as `scripts/dev-certs.sh` (RSA 2048, two days).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

const OPENSSL: &str = "/usr/bin/openssl";

/// The PEM files of a test PKI.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub dir: PathBuf,
    /// The CA certificate the server and the client certificates are signed by.
    pub ca: PathBuf,
    /// For `IP:127.0.0.1` and `DNS:localhost` (serverAuth).
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// clientAuth, signed by [`TestPki::ca`].
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A self-signed client certificate no server of the test trusts.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

impl TestPki {
    /// Makes the files in `dir` (created if missing).
    pub fn create(dir: &Path) -> io::Result<Self> {
        if !Path::new(OPENSSL).is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "openssl is required at /usr/bin/openssl (apt-get install openssl)",
            ));
        }
        std::fs::create_dir_all(dir)?;
        let days = ["-days", "2"];
        let self_signed = |name: &str, subject: &str| {
            let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
            openssl(
                dir,
                &[
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &crt,
                    "-subj", subject, days[0], days[1],
                ],
            )
        };
        self_signed("ca", "/CN=radflow test CA")?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )?;
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for who in ["server", "client"] {
            let (key, csr, crt, ext) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.crt"),
                format!("{who}.ext"),
            );
            let subject = format!("/CN=radflow test {who}");
            openssl(
                dir,
                &[
                    "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                    &subject,
                ],
            )?;
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-extfile",
                    &ext,
                    days[0],
                    days[1],
                ],
            )?;
        }
        self_signed("rogue", "/CN=rogue")?;
        let path = |name: &str| dir.join(name);
        Ok(Self {
            dir: dir.to_owned(),
            ca: path("ca.crt"),
            server_cert: path("server.crt"),
            server_key: path("server.key"),
            client_cert: path("client.crt"),
            client_key: path("client.key"),
            rogue_cert: path("rogue.crt"),
            rogue_key: path("rogue.key"),
        })
    }
}

fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new(OPENSSL).args(args).current_dir(dir).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
