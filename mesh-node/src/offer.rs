//! Offers: a release and the signed rollout directive that says which devices take it.
//!
//! Offline sites have no coordinator to decide who installs what. A site cache that imported
//! an export carrying a directive announces an offer on gossipsub ([`OFFERS_TOPIC`]); every
//! node verifies the manifest against the fleet's trust root (`release` role), the directive
//! against the same root (`rollout` role) and that both name the same release before it acts
//! on or relays the offer. Each device then applies the cohort bucketing itself.
//!
//! On the wire an offer is the magic `FLOFFER1`, then the manifest envelope and the
//! directive envelope, each as a big-endian u32 length and the bytes verbatim (signatures
//! cover those exact bytes), at most [`MAX_OFFER_LEN`] in all.

use flotilla_core::manifest::{ManifestError, VerifiedManifest, verify_signed};
use flotilla_core::rollout::{AssignmentError, RolloutDirective};
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;

/// The gossipsub topic of offers.
pub const OFFERS_TOPIC: &str = "flotilla/offers/1";
/// Largest encoded offer: gossipsub messages stay under 64 KiB.
pub const MAX_OFFER_LEN: usize = 60 << 10;
const MAGIC: &[u8; 8] = b"FLOFFER1";

/// Why an offer was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OfferError {
    /// Not an encoded offer, or too large.
    #[error("malformed offer: {0}")]
    Malformed(&'static str),
    /// The manifest did not verify.
    #[error("offer manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// The directive did not verify or does not name the manifest's release.
    #[error("offer directive: {0}")]
    Directive(#[from] AssignmentError),
}

/// Encodes an offer of `manifest` (a signed manifest envelope) under `directive` (a signed
/// directive envelope).
///
/// # Errors
/// [`OfferError::Malformed`] when the result would exceed [`MAX_OFFER_LEN`].
pub fn encode(manifest: &[u8], directive: &[u8]) -> Result<Vec<u8>, OfferError> {
    let len = MAGIC.len() + 8 + manifest.len() + directive.len();
    if len > MAX_OFFER_LEN {
        return Err(OfferError::Malformed("larger than an offer may be"));
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(MAGIC);
    for part in [manifest, directive] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    Ok(out)
}

fn decode(bytes: &[u8]) -> Result<(&[u8], &[u8]), OfferError> {
    if bytes.len() > MAX_OFFER_LEN {
        return Err(OfferError::Malformed("larger than an offer may be"));
    }
    let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or(OfferError::Malformed("no offer magic"))?;
    let part = |b: &'_ [u8]| -> Result<(usize, usize), OfferError> {
        let len: [u8; 4] = b.get(..4).and_then(|l| l.try_into().ok()).ok_or(OfferError::Malformed("truncated"))?;
        let len = u32::from_be_bytes(len) as usize;
        if b.len() < 4 + len {
            return Err(OfferError::Malformed("truncated"));
        }
        Ok((4, 4 + len))
    };
    let (a, b) = part(rest)?;
    let (manifest, rest) = (&rest[a..b], &rest[b..]);
    let (a, b) = part(rest)?;
    if b != rest.len() {
        return Err(OfferError::Malformed("trailing bytes"));
    }
    Ok((manifest, &rest[a..b]))
}

/// An offer whose manifest and directive verified against the trust root and agree.
#[derive(Debug, Clone)]
pub struct VerifiedOffer {
    manifest: VerifiedManifest,
    directive: RolloutDirective,
    directive_envelope: Vec<u8>,
}

impl VerifiedOffer {
    /// Verifies an encoded offer at `now`.
    ///
    /// # Errors
    /// [`OfferError`] naming what failed.
    pub fn verify(bytes: &[u8], root: &TrustRoot, now: Timestamp) -> Result<Self, OfferError> {
        let (manifest, directive_envelope) = decode(bytes)?;
        let manifest = verify_signed(manifest, root, now)?;
        let directive = RolloutDirective::verify(directive_envelope, root, now)?;
        directive.check_agreement(&manifest)?;
        Ok(Self { manifest, directive, directive_envelope: directive_envelope.to_vec() })
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &VerifiedManifest {
        &self.manifest
    }

    /// The verified directive.
    pub fn directive(&self) -> &RolloutDirective {
        &self.directive
    }

    /// The directive's envelope as signed.
    pub fn directive_envelope(&self) -> &[u8] {
        &self.directive_envelope
    }

    /// The offer encoded again (to relay or re-announce it).
    ///
    /// # Errors
    /// [`OfferError::Malformed`] (cannot happen for an offer that was decoded).
    pub fn encode(&self) -> Result<Vec<u8>, OfferError> {
        encode(self.manifest.envelope_json(), &self.directive_envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_roundtrips_and_junk_is_refused() {
        let bytes = encode(b"manifest", b"directive").unwrap();
        assert_eq!(decode(&bytes).unwrap(), (&b"manifest"[..], &b"directive"[..]));
        for bad in [&bytes[..bytes.len() - 1], &bytes[1..], b"FLOFFER1\0\0\0\x09abc", &[]] {
            assert!(matches!(decode(bad), Err(OfferError::Malformed(_))), "{bad:?}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(OfferError::Malformed("trailing bytes"))));
        assert!(encode(&vec![0; MAX_OFFER_LEN], b"").is_err());
    }
}
