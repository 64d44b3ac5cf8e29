//! Test certificates, made at test time with rcgen (no private key is ever committed): a
//! CA, server certificates it issues (valid, expired, for another name), written to a
//! temporary directory the `[tls]` section can point at, and client TLS options trusting
//! the CA.
//!
//! Owns: test plumbing only.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use pabal_client::TlsOptions;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A test certificate authority and a directory for the files it issues.
#[derive(Debug)]
pub struct TestPki {
    ca_params: CertificateParams,
    ca_key: KeyPair,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    dir: PathBuf,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl TestPki {
    /// A fresh CA and an empty temporary directory.
    pub fn new() -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pabal test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "pabal-pki-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TestPki {
            ca_der: ca.der().clone(),
            ca_params,
            ca_key,
            dir,
        }
    }

    /// Issues a certificate for `localhost` valid from `not_before` to `not_after` (years)
    /// and writes it and its key as `cert.pem` and `key.pem`; returns their paths.
    pub fn issue_years(&self, not_before: i32, not_after: i32) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after, 1, 1);
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.dir.join("cert.pem");
        let key_path = self.dir.join("key.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// A certificate valid now (until 2100).
    pub fn issue(&self) -> (PathBuf, PathBuf) {
        self.issue_years(2020, 2100)
    }

    /// A path in this PKI's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Client TLS options trusting this CA only, for `localhost`.
    pub fn client(&self) -> TlsOptions {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        TlsOptions::new(roots, "localhost").unwrap()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
