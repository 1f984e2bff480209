//! Where results go: DICOM destinations by name and the routes that choose them.
//!
//! ```toml
//! [[destination]]
//! name = "pacs"            # also the subject: radflow.export.pacs
//! ae_title = "ORTHANC"     # Called AE title
//! host = "orthanc"
//! port = 4242
//! calling_ae = "RADFLOW"   # optional; the AE title radflow presents
//!
//! [[destination]]
//! name = "archive"
//! ae_title = "ARCHIVE"
//! host = "archive.example.org"
//! port = 2762              # the registered DICOM TLS port
//!
//! [destination.tls]        # DICOM over TLS (PS3.15 Annex B) to the destination above
//! ca = "/etc/radflow/tls/archive-ca.pem"  # CA certificates (PEM) its certificate must chain to
//! cert = "/etc/radflow/tls/radflow.pem"   # optional, with `key`: the client certificate
//! key = "/etc/radflow/tls/radflow.key"    #   (mutual TLS), PEM chain and private key
//! server_name = "archive"  # optional; the name its certificate carries (default: host)
//!
//! [[destination]]
//! name = "research"
//! ae_title = "RESEARCH"
//! host = "research.example.org"
//! port = 11112
//!
//! [destination.deidentify] # PS3.15 Basic Application Confidentiality Profile
//! key_file = "/etc/radflow/deid/key"      # secret of the UID and patient pseudonyms
//!
//! [[route]]
//! models = ["demo-tissue"] # optional; every model when absent
//! to = ["pacs", "caller"]  # "caller": back to the AE that sent the study
//! ```
//!
//! `caller` resolves to the destination whose AE title is the study's Calling AE
//! title: the node that sent the images, at the address configured for it (a sender's
//! own port is not known from its association). A route to `caller` for a study sent
//! by an AE with no destination is reported, not guessed.
//!
//! A `[destination.tls]` table belongs to the `[[destination]]` above it. Its files are
//! read and checked when the file is loaded (an unreadable or invalid one is refused,
//! naming the destination and the file) and read again for every new association, so
//! renewed certificates are used without a restart. Relative paths are taken from the
//! working directory. Without the table the destination is sent to over plain TCP.
//!
//! A `[destination.deidentify]` table makes every object sent to that destination
//! de-identified first ([`crate::deidentify`]); its key file is read and checked when the
//! file is loaded, and again for every job.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use radflow_listener::scu::{TlsClient, TlsConnector};
use radflow_listener::tls::TlsError;
use serde::Deserialize;

use crate::deidentify::{DeidentifyConfig, Key};

/// The route target that means "the AE that sent the study".
pub const CALLER: &str = "caller";

/// AE title radflow presents when a destination does not name one.
pub const DEFAULT_CALLING_AE: &str = "RADFLOW";

/// Why a destinations file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// One DICOM node results can be sent to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Name in routes, metrics and subjects: letters, digits, `-` and `_`.
    pub name: String,
    /// Called AE title.
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// Calling AE title radflow presents to it.
    #[serde(default = "default_calling_ae")]
    pub calling_ae: String,
    /// DICOM over TLS; plain TCP when `None`.
    #[serde(default)]
    pub tls: Option<DestinationTls>,
    /// The Basic Application Confidentiality Profile on every object sent; objects go
    /// as written when `None`.
    #[serde(default)]
    pub deidentify: Option<DeidentifyConfig>,
}

/// The `[destination.tls]` table: the client side of DICOM over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationTls {
    /// CA certificates (PEM) the destination's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate chain (PEM) for destinations that authenticate radflow.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name the destination's certificate carries; its `host` when absent.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl DestinationTls {
    /// The files as the C-STORE client takes them.
    pub fn client(&self) -> TlsClient {
        TlsClient {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            server_name: self.server_name.clone(),
        }
    }

    /// Reads the files into a client TLS configuration.
    pub fn connector(&self) -> Result<TlsConnector, TlsError> {
        self.client().connector()
    }
}

fn default_calling_ae() -> String {
    DEFAULT_CALLING_AE.to_owned()
}

impl Destination {
    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Which results go where.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Model names; every model when empty.
    #[serde(default)]
    pub models: Vec<String>,
    /// Destination names, or `caller`.
    pub to: Vec<String>,
}

/// The destinations file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destinations {
    #[serde(default, rename = "destination")]
    pub destinations: Vec<Destination>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
}

/// Where one result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    Destination(&'a Destination),
    /// Routed back to its caller, but no destination has the caller's AE title.
    UnknownCaller(String),
}

impl Destinations {
    /// Reads and checks a destinations file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks destinations; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parsed: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source: Box::new(source),
        })?;
        parsed.validate()?;
        Ok(parsed)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut names = BTreeSet::new();
        for d in &self.destinations {
            let token_ok = !d.name.is_empty()
                && d.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !token_ok {
                return invalid(format!(
                    "destination name {:?}: use letters, digits, '-' and '_' only",
                    d.name
                ));
            }
            if d.name == CALLER {
                return invalid(format!(
                    "{CALLER:?} is the route target for the sending AE; name the destination otherwise"
                ));
            }
            if !names.insert(d.name.as_str()) {
                return invalid(format!("destination {:?} is listed twice", d.name));
            }
            for (what, ae) in [("ae_title", &d.ae_title), ("calling_ae", &d.calling_ae)] {
                let ae_ok = !ae.trim().is_empty()
                    && ae.len() <= 16
                    && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\');
                if !ae_ok {
                    return invalid(format!(
                        "destination {:?}: {what} {ae:?} is not an AE title (1 to 16 printable characters, no backslash)",
                        d.name
                    ));
                }
            }
            if d.host.trim().is_empty() || d.port == 0 {
                return invalid(format!(
                    "destination {:?}: host and port are required",
                    d.name
                ));
            }
            if let Some(tls) = &d.tls {
                if tls.cert.is_some() != tls.key.is_some() {
                    return invalid(format!(
                        "destination {:?}: tls: `cert` and `key` go together (the client certificate and its private key); give both or neither",
                        d.name
                    ));
                }
                // Reads every file now, so a typo is found at start, not at the first
                // export.
                let checked = tls
                    .connector()
                    .and_then(|c| c.server_name_for(&d.addr()).map(|_| ()));
                if let Err(e) = checked {
                    return invalid(format!("destination {:?}: tls: {e}", d.name));
                }
            }
            if let Some(deid) = &d.deidentify
                && let Err(e) = Key::load(&deid.key_file)
            {
                return invalid(format!("destination {:?}: deidentify: {e}", d.name));
            }
        }
        for r in &self.routes {
            if r.to.is_empty() {
                return invalid("a route without destinations (`to`)".into());
            }
            for to in &r.to {
                if to != CALLER && !names.contains(to.as_str()) {
                    return invalid(format!(
                        "a route goes to {to:?}, which is not a destination"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The destination of a name.
    pub fn get(&self, name: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.name == name)
    }

    /// Where a result of `model`, from a study sent by `calling_ae`, goes: each
    /// destination once, in route order.
    pub fn targets(&self, model: &str, calling_ae: &str) -> Vec<Target<'_>> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for route in &self.routes {
            if !route.models.is_empty() && !route.models.iter().any(|m| m == model) {
                continue;
            }
            for to in &route.to {
                let target = if to == CALLER {
                    let caller = calling_ae.trim();
                    match self
                        .destinations
                        .iter()
                        .find(|d| d.ae_title.trim() == caller)
                    {
                        Some(d) => Target::Destination(d),
                        None => Target::UnknownCaller(caller.to_owned()),
                    }
                } else {
                    Target::Destination(self.get(to).expect("validated"))
                };
                let key = match &target {
                    Target::Destination(d) => d.name.clone(),
                    Target::UnknownCaller(ae) => format!("{CALLER}:{ae}"),
                };
                if seen.insert(key) {
                    out.push(target);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[destination]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

[[destination]]
name = "ct-console"
ae_title = "CT1"
host = "10.0.0.5"
port = 104
calling_ae = "RADFLOW_AI"

[[route]]
models = ["demo-tissue"]
to = ["pacs", "caller"]

[[route]]
to = ["pacs"]
"#;

    fn names(targets: &[Target<'_>]) -> Vec<String> {
        targets
            .iter()
            .map(|t| match t {
                Target::Destination(d) => d.name.clone(),
                Target::UnknownCaller(ae) => format!("?{ae}"),
            })
            .collect()
    }

    #[test]
    fn routes_pick_destinations_once_and_resolve_the_caller() {
        let d = Destinations::parse(FILE, "test").unwrap();
        assert_eq!(d.get("pacs").unwrap().calling_ae, "RADFLOW");
        assert_eq!(d.get("ct-console").unwrap().addr(), "10.0.0.5:104");
        assert_eq!(
            names(&d.targets("demo-tissue", "CT1")),
            ["pacs", "ct-console"]
        );
        assert_eq!(names(&d.targets("demo-tissue", "MR9")), ["pacs", "?MR9"]);
        assert_eq!(names(&d.targets("other", "CT1")), ["pacs"]);
        assert!(
            Destinations::default()
                .targets("demo-tissue", "CT1")
                .is_empty()
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let bad = |text: &str, want: &str| {
            let err = Destinations::parse(text, "test").unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        };
        let one =
            "[[destination]]\nname = \"pacs\"\nae_title = \"ORTHANC\"\nhost = \"h\"\nport = 4242\n";
        bad(&format!("{one}{one}"), "listed twice");
        bad(&one.replace("\"pacs\"", "\"pacs.main\""), "letters, digits");
        bad(&one.replace("\"pacs\"", "\"caller\""), "route target");
        bad(
            &one.replace("ORTHANC", "A_TITLE_LONGER_THAN_16"),
            "not an AE title",
        );
        bad(&one.replace("port = 4242", "port = 0"), "host and port");
        bad(
            &format!("{one}[[route]]\nto = [\"nowhere\"]\n"),
            "not a destination",
        );
        bad(
            &format!("{one}[[route]]\nto = []\n"),
            "without destinations",
        );
        bad(&format!("{one}tls = true\n"), "invalid type");
        bad(&format!("{one}secure = true\n"), "unknown field");
        let tls = format!("{one}[destination.tls]\nca = \"/nonexistent/ca.pem\"\n");
        bad(&tls, "/nonexistent/ca.pem");
        bad(
            &format!("{tls}cert = \"/nonexistent/c.pem\"\n"),
            "go together",
        );
        bad(
            &format!("{tls}key = \"/nonexistent/k.pem\"\n"),
            "go together",
        );
        bad(&format!("{tls}verify = false\n"), "unknown field");
        let deid = format!("{one}[destination.deidentify]\nkey_file = \"/nonexistent/deid.key\"\n");
        bad(
            &deid,
            "deidentify: cannot read the de-identification key /nonexistent/deid.key",
        );
        bad(
            &format!("{one}[destination.deidentify]\n"),
            "missing field `key_file`",
        );
    }
}
