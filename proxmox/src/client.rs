//! A small blocking client of the PVE REST API: API-token auth, TLS checked against a
//! pinned SHA-256 fingerprint (as PVE's own tools pin a node) or a CA file, and errors that
//! say what to fix.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handoff::config::ProxmoxConfig;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::Value;

/// How long one request may take; a node that does not answer is reported, not waited on.
const TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "cannot read the API token's secret {path}: {why}\n  fix: put the secret PVE showed when the token was \
         created in that file (`install -m 600 /dev/stdin {path}`), or point [proxmox] token_secret_file at it"
    )]
    Secret { path: PathBuf, why: String },
    #[error(
        "refusing to use the API token's secret {path}: it is readable by {who} (mode {mode:o}); \
         fix: chmod 600 {path}"
    )]
    SecretExposed {
        path: PathBuf,
        who: &'static str,
        mode: u32,
    },
    #[error("cannot read [proxmox] ca_file {path}: {why}")]
    CaFile { path: PathBuf, why: String },
    #[error(
        "cannot reach Proxmox VE at {url}: {why}\n  check: is the [proxmox] url right, is the node up, \
         does pveproxy run on it (systemctl status pveproxy) and is port 8006 reachable from here?"
    )]
    Unreachable { url: String, why: String },
    #[error(
        "the certificate of {url} is not the one pinned in [proxmox] fingerprint: it has SHA-256 {got}, \
         the config says {want}. Nothing was sent.\n  If the node's certificate was renewed, compare with \
         `pvenode cert info` on the node and update fingerprint; otherwise this is not your node"
    )]
    Fingerprint { url: String, got: String, want: String },
    #[error(
        "the certificate of {url} does not verify against [proxmox] ca_file: {why}. Nothing was sent.\n  \
         fix: point ca_file at the CA that signed the node's certificate (/etc/pve/pve-root-ca.pem on the node), \
         or pin its fingerprint instead (`pvenode cert info`)"
    )]
    Certificate { url: String, why: String },
    #[error(
        "Proxmox VE at {url} refused the API token {token}: {message}\n  check: [proxmox] token is \
         user@realm!tokenid exactly as `pveum user token list USER@REALM` shows it, and token_secret_file holds \
         that token's secret (a token that was deleted and re-created has a new secret)"
    )]
    BadToken {
        url: String,
        token: String,
        message: String,
    },
    #[error(
        "the API token {token} lacks the privilege {privilege} on {path}\n  fix (on the node): \
         `pveum role add HandoffVM --privs \"VM.Audit,VM.PowerMgmt\"` once, then \
         `pveum acl modify {path} --tokens '{token}' --roles HandoffVM` (a token with privilege separation \
         needs the ACL on the token itself, not only on its user)"
    )]
    Privilege {
        token: String,
        path: String,
        privilege: String,
    },
    #[error(
        "VM {vmid} is locked ({lock}): {what} holds it, and PVE refuses to start or stop a locked VM. \
         Wait for that task to end (the node's Tasks list, or `pvesh get /nodes/{node}/tasks --vmid {vmid}`); \
         `qm unlock {vmid}` only if no task is running for it"
    )]
    Locked {
        vmid: u32,
        lock: String,
        what: &'static str,
        node: String,
    },
    // PVE lists and shows a VM only to a token with VM.Audit on it: a missing privilege
    // looks exactly like a missing VM, so both are said.
    #[error(
        "Proxmox VE at {url} has no VM {vmid} that this API token may see; `qm list` on the node lists them \
         (is [[vm]] vmid right?). PVE hides a VM from a token without VM.Audit on /vms/{vmid}: \
         `pveum acl modify /vms/{vmid} --tokens '{token}' --roles HandoffVM` (docs/proxmox.md)"
    )]
    NoVm { url: String, vmid: u32, token: String },
    #[error("Proxmox VE at {url}: {method} {path} failed with HTTP {status}: {message}")]
    Http {
        url: String,
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
}

impl ApiError {
    /// What a lock value means, in words.
    pub fn lock_words(lock: &str) -> &'static str {
        match lock {
            "backup" => "a backup (vzdump)",
            "migrate" => "a migration",
            "snapshot" | "snapshot-delete" | "rollback" => "a snapshot task",
            "clone" => "a clone",
            "create" => "its creation",
            "suspending" | "suspended" => "a suspend to disk",
            _ => "a task",
        }
    }
}

/// The SHA-256 of a certificate in PVE's spelling, `AB:CD:…`.
pub fn fingerprint_of(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Accepts exactly the certificate whose SHA-256 is pinned (the handshake's signature is
/// still verified with that certificate's key). What it saw is kept for the error message.
#[derive(Debug)]
struct Pinned {
    want: String,
    seen: Arc<Mutex<Option<String>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint_of(end_entity.as_ref());
        if got.eq_ignore_ascii_case(&self.want) {
            return Ok(ServerCertVerified::assertion());
        }
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(got.clone());
        Err(rustls::Error::General(format!(
            "certificate fingerprint {got} is not the pinned one"
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Reads the token's secret: a regular file that neither group nor others can read.
pub fn read_secret(path: &Path) -> Result<String, ApiError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |why: String| ApiError::Secret {
        path: path.to_owned(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("it is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let who = if mode & 0o007 != 0 {
            "everyone"
        } else {
            "its group"
        };
        return Err(ApiError::SecretExposed {
            path: path.to_owned(),
            who,
            mode,
        });
    }
    let text = handoff::bounded::read_to_string(path, handoff::bounded::Links::Follow)
        .map_err(|e| err(e.to_string()))?;
    let secret = text.trim().to_owned();
    if secret.is_empty() {
        return Err(err("it is empty".into()));
    }
    Ok(secret)
}

/// One PVE endpoint, authenticated.
pub struct Client {
    pub url: String,
    pub token: String,
    agent: ureq::Agent,
    auth: String,
    seen: Arc<Mutex<Option<String>>>,
    pinned: Option<String>,
}

impl Client {
    pub fn new(p: &ProxmoxConfig) -> Result<Self, ApiError> {
        let secret = read_secret(&p.token_secret_file)?;
        // ring, not aws-lc-rs: no C/cmake build. rustls 0.23.48 deprecates ring's provider
        // for lacking post-quantum key exchange; a LAN link to pveproxy does not need it.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = Arc::new(Mutex::new(None));
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions");
        let tls = match (&p.fingerprint, &p.ca_file) {
            (Some(f), _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    want: f.clone(),
                    seen: seen.clone(),
                    provider,
                }))
                .with_no_client_auth(),
            (None, Some(ca)) => {
                use rustls::pki_types::pem::PemObject;
                let ca_err = |why: String| ApiError::CaFile {
                    path: ca.clone(),
                    why,
                };
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| ca_err(e.to_string()))? {
                    roots
                        .add(cert.map_err(|e| ca_err(e.to_string()))?)
                        .map_err(|e| ca_err(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(ca_err("it holds no PEM certificate".into()));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            // Config::validate refuses this; never fall back to accepting anything.
            (None, None) => {
                return Err(ApiError::CaFile {
                    path: PathBuf::new(),
                    why: "[proxmox] names neither fingerprint nor ca_file".into(),
                });
            }
        };
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout(TIMEOUT)
            .build();
        Ok(Self {
            url: p.url.trim_end_matches('/').to_owned(),
            token: p.token.clone(),
            auth: format!("PVEAPIToken={}={secret}", p.token),
            agent,
            seen,
            pinned: p.fingerprint.clone(),
        })
    }

    pub fn get(&self, path: &str) -> Result<Value, ApiError> {
        let req = self
            .agent
            .get(&self.endpoint(path))
            .set("Authorization", &self.auth);
        self.answer("GET", path, req.call())
    }

    pub fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<Value, ApiError> {
        let req = self
            .agent
            .post(&self.endpoint(path))
            .set("Authorization", &self.auth);
        self.answer("POST", path, req.send_form(form))
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}/api2/json{path}", self.url)
    }

    fn answer(
        &self,
        method: &'static str,
        path: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<Value, ApiError> {
        match r {
            Ok(resp) => {
                let v: Value = read_json(resp).map_err(|e| ApiError::Http {
                    url: self.url.clone(),
                    method,
                    path: path.to_owned(),
                    status: 200,
                    message: format!("the answer is not JSON: {e}"),
                })?;
                Ok(v.get("data").cloned().unwrap_or(Value::Null))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let reason = resp.status_text().to_owned();
                let body: Value = read_json(resp).unwrap_or(Value::Null);
                let mut message = body
                    .get("message")
                    .and_then(Value::as_str)
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty())
                    .unwrap_or(reason);
                if let Some(errors) = body.get("errors").and_then(Value::as_object) {
                    for (k, v) in errors {
                        message += &format!("; {k}: {}", v.as_str().unwrap_or_default().trim());
                    }
                }
                Err(self.status_error(method, path, status, message))
            }
            Err(ureq::Error::Transport(t)) => {
                if let Some(got) = self.seen.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    return Err(ApiError::Fingerprint {
                        url: self.url.clone(),
                        got,
                        want: self.pinned.clone().unwrap_or_default(),
                    });
                }
                let why = t.to_string();
                if why.contains("invalid peer certificate")
                    || why.contains("UnknownIssuer")
                    || why.contains("certificate")
                {
                    return Err(ApiError::Certificate {
                        url: self.url.clone(),
                        why,
                    });
                }
                Err(ApiError::Unreachable {
                    url: self.url.clone(),
                    why,
                })
            }
        }
    }

    fn status_error(&self, method: &'static str, path: &str, status: u16, message: String) -> ApiError {
        if status == 401 {
            return ApiError::BadToken {
                url: self.url.clone(),
                token: self.token.clone(),
                message,
            };
        }
        if status == 403
            && let Some(inner) = message
                .strip_prefix("Permission check failed (")
                .and_then(|m| m.split(')').next())
            && let Some((acl_path, privilege)) = inner.split_once(',')
        {
            return ApiError::Privilege {
                token: self.token.clone(),
                path: acl_path.trim().to_owned(),
                privilege: privilege.trim().to_owned(),
            };
        }
        if let Some(lock) = message
            .strip_prefix("VM is locked (")
            .and_then(|m| m.split(')').next())
            && let Some(vmid) = vmid_in(path)
        {
            return ApiError::Locked {
                vmid,
                lock: lock.to_owned(),
                what: ApiError::lock_words(lock),
                node: node_in(path).unwrap_or("NODE").to_owned(),
            };
        }
        if message.contains("does not exist")
            && let Some(vmid) = vmid_in(path)
        {
            return ApiError::NoVm {
                url: self.url.clone(),
                vmid,
                token: self.token.clone(),
            };
        }
        ApiError::Http {
            url: self.url.clone(),
            method,
            path: path.to_owned(),
            status,
            message,
        }
    }
}

fn read_json(resp: ureq::Response) -> Result<Value, String> {
    // into_string caps the body (10 MB): a PVE answer is a few KiB.
    let text = resp.into_string().map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

fn vmid_in(path: &str) -> Option<u32> {
    let mut it = path.split('/');
    it.by_ref().find(|s| *s == "qemu")?;
    it.next()?.parse().ok()
}

fn node_in(path: &str) -> Option<&str> {
    let mut it = path.split('/');
    it.by_ref().find(|s| *s == "nodes")?;
    it.next()
}

/// Percent-encodes a path segment (a UPID holds `:`, `@` and `!`).
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}
