//! Trust-root rotation on the device (TUF's root update): keys rotate without reflashing.
//!
//! The trust root the device was provisioned with (`trust_root` in the config, typically on
//! the read-only image) stays the anchor. Every newer root the device accepts is kept
//! verbatim as `<state_dir>/trust-roots/<version>.root.json`, each written atomically (temp
//! file, fsync, rename, fsync the directory) right after it verified. At start the agent
//! re-walks the chain from the provisioned root through the kept files, checking every step
//! again, so a damaged or planted file can never be trusted on its own.
//!
//! A step N → N+1 is accepted only as [`TrustRoot::rotate`] rules: version N+1, signed by
//! a threshold of N's root keys *and* of its own. The chain comes from the coordinator
//! (`GET /v1/products/{p}/trust-roots?after=N`) when a release fails verification under the
//! current root. A step that does not verify stops the walk: the roots verified before it are
//! kept, the bad one is refused with an error naming its version and why.

use std::path::{Path, PathBuf};

use flotilla_core::trust::{RootUpdateError, TrustRoot};

use crate::durable::write_atomic;

/// Largest trust-root envelope taken from a chain (core bounds the payload itself).
pub const MAX_ROOT_BYTES: usize = 512 << 10;
/// Most roots taken from one chain answer (a device years behind still catches up).
pub const MAX_CHAIN: usize = 64;

/// Why a trust-root chain was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootChainError {
    /// The provisioned root cannot be read.
    #[error("trust root {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The provisioned root does not load.
    #[error("trust root {path}: {source}")]
    Provisioned {
        /// The file.
        path: PathBuf,
        /// Why.
        source: RootUpdateError,
    },
    /// A step of the chain does not follow from the root before it.
    #[error(
        "trust root version {version} refused (the device keeps trusting version {kept}): {source}; \
         a forged or unchained root, or a coordinator serving a bad chain"
    )]
    Refused {
        /// The refused version, as the chain labels it.
        version: u64,
        /// The version still trusted.
        kept: u64,
        /// Why.
        source: RootUpdateError,
    },
    /// The chain answer is malformed or too large.
    #[error("trust root chain: {0}")]
    Malformed(String),
    /// Keeping an accepted root failed.
    #[error("keeping trust root version {version} in {dir}: {source}")]
    Persist {
        /// The version.
        version: u64,
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The device's roots: the provisioned anchor and the directory of accepted successors.
#[derive(Debug, Clone)]
pub struct RootStore {
    provisioned: PathBuf,
    dir: PathBuf,
}

impl RootStore {
    /// A store over the provisioned root file and `dir` (under the state directory).
    pub fn new(provisioned: &Path, dir: &Path) -> Self {
        Self { provisioned: provisioned.to_path_buf(), dir: dir.to_path_buf() }
    }

    fn file(&self, version: u64) -> PathBuf {
        self.dir.join(format!("{version}.root.json"))
    }

    /// The newest root reachable from the provisioned one through the kept successors, each
    /// step verified again. A kept file that does not verify ends the walk (logged).
    ///
    /// # Errors
    /// [`RootChainError::Provisioned`] when the anchor itself does not load.
    pub fn load(&self) -> Result<TrustRoot, RootChainError> {
        let provisioned = |source| RootChainError::Provisioned { path: self.provisioned.clone(), source };
        let bytes = std::fs::read(&self.provisioned)
            .map_err(|source| RootChainError::Read { path: self.provisioned.clone(), source })?;
        let mut root = TrustRoot::from_trusted_json(&bytes).map_err(provisioned)?;
        loop {
            let path = self.file(root.version() + 1);
            let Ok(bytes) = std::fs::read(&path) else { break };
            match root.rotate(&bytes) {
                Ok(next) => root = next,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "kept trust root does not verify; ignoring it");
                    break;
                }
            }
        }
        Ok(root)
    }

    /// Walks `chain` (versions with their envelopes, any order) from `current`: every step
    /// must verify against the one before; each accepted root is kept durably before the
    /// next is looked at. Returns the newest accepted root (`current` when nothing is newer).
    ///
    /// # Errors
    /// [`RootChainError::Refused`] at the first step that does not verify (the roots before
    /// it stay accepted and kept; `accepted` holds the newest of them), or persistence.
    pub fn advance(
        &self,
        current: &TrustRoot,
        chain: &[(u64, Vec<u8>)],
        accepted: &mut Option<TrustRoot>,
    ) -> Result<(), RootChainError> {
        if chain.len() > MAX_CHAIN {
            return Err(RootChainError::Malformed(format!("{} roots, at most {MAX_CHAIN} taken", chain.len())));
        }
        let mut steps: Vec<&(u64, Vec<u8>)> = chain.iter().filter(|(v, _)| *v > current.version()).collect();
        steps.sort_by_key(|(v, _)| *v);
        let mut root = current.clone();
        for (version, envelope) in steps {
            if envelope.len() > MAX_ROOT_BYTES {
                return Err(RootChainError::Malformed(format!(
                    "root version {version} is over {MAX_ROOT_BYTES} bytes"
                )));
            }
            let next = root.rotate(envelope).map_err(|source| RootChainError::Refused {
                version: *version,
                kept: root.version(),
                source,
            })?;
            let persist = |source| RootChainError::Persist { version: next.version(), dir: self.dir.clone(), source };
            std::fs::create_dir_all(&self.dir).map_err(persist)?;
            write_atomic(&self.file(next.version()), next.envelope_json()).map_err(persist)?;
            tracing::info!(from = root.version(), to = next.version(), "trust root rotated");
            root = next;
            *accepted = Some(root.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use flotilla_core::keys::{Algorithm, SigningKey};
    use flotilla_core::time::Timestamp;
    use flotilla_core::trust::RootDocument;

    use super::*;

    struct Keys {
        root: SigningKey,
        release: SigningKey,
        rollout: SigningKey,
    }

    fn keys() -> Keys {
        let k = || SigningKey::generate(Algorithm::Ed25519).unwrap();
        Keys { root: k(), release: k(), rollout: k() }
    }

    fn doc(version: u64, k: &Keys) -> RootDocument {
        RootDocument::new(
            version,
            Timestamp::now().saturating_add(std::time::Duration::from_secs(3600)),
            (&[k.root.public_key()], 1),
            (&[k.release.public_key()], 1),
            (&[k.rollout.public_key()], 1),
        )
    }

    fn signed(d: &RootDocument, by: &[&SigningKey]) -> Vec<u8> {
        d.sign(by).unwrap().to_json()
    }

    /// v1 (keys a), v2 (keys b, signed by a and b), v3 (keys c, signed by b and c).
    fn chain() -> (Vec<u8>, Vec<(u64, Vec<u8>)>, Keys, Keys) {
        let (a, b, c) = (keys(), keys(), keys());
        let v1 = signed(&doc(1, &a), &[&a.root]);
        let v2 = signed(&doc(2, &b), &[&a.root, &b.root]);
        let v3 = signed(&doc(3, &c), &[&b.root, &c.root]);
        (v1, vec![(3, v3), (2, v2)], b, c)
    }

    fn store(dir: &Path, v1: &[u8]) -> RootStore {
        std::fs::write(dir.join("root.json"), v1).unwrap();
        RootStore::new(&dir.join("root.json"), &dir.join("trust-roots"))
    }

    #[test]
    fn a_valid_chain_is_kept_and_reloaded_from_the_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, chain, _, _) = chain();
        let s = store(dir.path(), &v1);
        let current = s.load().unwrap();
        assert_eq!(current.version(), 1);
        let mut accepted = None;
        s.advance(&current, &chain, &mut accepted).unwrap();
        assert_eq!(accepted.unwrap().version(), 3);
        assert_eq!(s.load().unwrap().version(), 3);
        // Nothing newer: nothing accepted.
        let mut again = None;
        s.advance(&s.load().unwrap(), &chain, &mut again).unwrap();
        assert!(again.is_none());
    }

    #[test]
    fn a_forged_step_is_refused_and_the_verified_prefix_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, mut chain, b, _) = chain();
        let mallory = keys();
        // v3 signed only by the forger's own new keys: not by a threshold of v2's.
        chain[0] = (3, signed(&doc(3, &mallory), &[&mallory.root]));
        let s = store(dir.path(), &v1);
        let mut accepted = None;
        let e = s.advance(&s.load().unwrap(), &chain, &mut accepted).unwrap_err();
        assert!(
            matches!(
                e,
                RootChainError::Refused { version: 3, kept: 2, source: RootUpdateError::NotSignedByCurrent(_) }
            ),
            "{e}"
        );
        assert_eq!(accepted.unwrap().version(), 2);
        assert_eq!(s.load().unwrap().version(), 2);
        assert!(!dir.path().join("trust-roots/3.root.json").exists());
        // Signed by v2's root key but not by its own: refused as well.
        let half = signed(&doc(3, &mallory), &[&b.root]);
        let e = s.advance(&s.load().unwrap(), &[(3, half)], &mut None).unwrap_err();
        assert!(matches!(e, RootChainError::Refused { source: RootUpdateError::NotSignedBySelf(_), .. }), "{e}");
    }

    #[test]
    fn an_unchained_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, chain, _, _) = chain();
        let s = store(dir.path(), &v1);
        // v3 alone (v2 missing): its signers are not v1's root keys, and its version skips.
        let only_v3: Vec<_> = chain.into_iter().filter(|(v, _)| *v == 3).collect();
        let e = s.advance(&s.load().unwrap(), &only_v3, &mut None).unwrap_err();
        assert!(matches!(e, RootChainError::Refused { version: 3, kept: 1, .. }), "{e}");
        assert_eq!(s.load().unwrap().version(), 1);
    }

    #[test]
    fn a_planted_file_in_the_state_directory_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, _, _, _) = chain();
        let mallory = keys();
        let s = store(dir.path(), &v1);
        std::fs::create_dir_all(dir.path().join("trust-roots")).unwrap();
        std::fs::write(dir.path().join("trust-roots/2.root.json"), signed(&doc(2, &mallory), &[&mallory.root]))
            .unwrap();
        assert_eq!(s.load().unwrap().version(), 1);
    }
}
