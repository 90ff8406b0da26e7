//! JWT signatures on ring, the crypto backend rustls already brings: a jsonwebtoken
//! [`CryptoProvider`] for HS256/384/512, RS256/384/512, PS256/384/512, ES256 and ES384. EdDSA,
//! which dsreg refuses, has no implementation at all. [`install`] makes it the process's
//! provider; every use of jsonwebtoken in dsreg goes through a function that calls it first.

use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, KeyPair, RsaKeyPair};
use ring::{digest, hmac};

/// The provider; see the module doc.
static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components,
        extract_ec_public_key_coordinates,
        compute_digest,
    },
};

/// Makes ring jsonwebtoken's crypto backend for this process (once; later calls do nothing).
/// Call it before the first signature is made or checked.
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Fails only if another provider was installed first; jsonwebtoken then keeps it.
        if PROVIDER.install_default().is_err() {
            tracing::warn!("a JWT crypto provider was installed before dsreg's");
        }
    });
}

fn hmac_algorithm(algorithm: Algorithm) -> Option<hmac::Algorithm> {
    match algorithm {
        Algorithm::HS256 => Some(hmac::HMAC_SHA256),
        Algorithm::HS384 => Some(hmac::HMAC_SHA384),
        Algorithm::HS512 => Some(hmac::HMAC_SHA512),
        _ => None,
    }
}

fn rsa_verification(algorithm: Algorithm) -> Option<&'static sig::RsaParameters> {
    match algorithm {
        Algorithm::RS256 => Some(&sig::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => Some(&sig::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => Some(&sig::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::PS256 => Some(&sig::RSA_PSS_2048_8192_SHA256),
        Algorithm::PS384 => Some(&sig::RSA_PSS_2048_8192_SHA384),
        Algorithm::PS512 => Some(&sig::RSA_PSS_2048_8192_SHA512),
        _ => None,
    }
}

fn rsa_signing(algorithm: Algorithm) -> Option<&'static dyn sig::RsaEncoding> {
    match algorithm {
        Algorithm::RS256 => Some(&sig::RSA_PKCS1_SHA256),
        Algorithm::RS384 => Some(&sig::RSA_PKCS1_SHA384),
        Algorithm::RS512 => Some(&sig::RSA_PKCS1_SHA512),
        Algorithm::PS256 => Some(&sig::RSA_PSS_SHA256),
        Algorithm::PS384 => Some(&sig::RSA_PSS_SHA384),
        Algorithm::PS512 => Some(&sig::RSA_PSS_SHA512),
        _ => None,
    }
}

fn ecdsa_verification(algorithm: Algorithm) -> Option<&'static sig::EcdsaVerificationAlgorithm> {
    match algorithm {
        Algorithm::ES256 => Some(&sig::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => Some(&sig::ECDSA_P384_SHA384_FIXED),
        _ => None,
    }
}

fn ecdsa_signing(algorithm: Algorithm) -> Option<&'static sig::EcdsaSigningAlgorithm> {
    match algorithm {
        Algorithm::ES256 => Some(&sig::ECDSA_P256_SHA256_FIXED_SIGNING),
        Algorithm::ES384 => Some(&sig::ECDSA_P384_SHA384_FIXED_SIGNING),
        _ => None,
    }
}

/// A key for `algorithm`, checked when the signer or verifier is made.
enum Checker {
    Hmac(hmac::Key),
    Rsa(&'static sig::RsaParameters, DecodingKey),
    Ecdsa(&'static sig::EcdsaVerificationAlgorithm, DecodingKey),
}

struct RingVerifier {
    algorithm: Algorithm,
    checker: Checker,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let checked = match &self.checker {
            Checker::Hmac(key) => hmac::verify(key, message, signature),
            Checker::Rsa(parameters, key) => match key.kind() {
                DecodingKeyKind::SecretOrDer(der) => {
                    sig::UnparsedPublicKey::new(*parameters, der).verify(message, signature)
                }
                DecodingKeyKind::RsaModulusExponent { n, e } => {
                    sig::RsaPublicKeyComponents { n, e }.verify(parameters, message, signature)
                }
            },
            Checker::Ecdsa(algorithm, key) => {
                sig::UnparsedPublicKey::new(*algorithm, key.as_bytes()).verify(message, signature)
            }
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let algorithm = *algorithm;
    let checker = if let Some(hmac_algorithm) = hmac_algorithm(algorithm) {
        Checker::Hmac(hmac::Key::new(hmac_algorithm, key.try_get_hmac_secret()?))
    } else if let Some(parameters) = rsa_verification(algorithm) {
        require_family(key.family(), AlgorithmFamily::Rsa)?;
        Checker::Rsa(parameters, key.clone())
    } else if let Some(ecdsa) = ecdsa_verification(algorithm) {
        require_family(key.family(), AlgorithmFamily::Ec)?;
        Checker::Ecdsa(ecdsa, key.clone())
    } else {
        return Err(ErrorKind::InvalidAlgorithm.into());
    };
    Ok(Box::new(RingVerifier { algorithm, checker }))
}

fn require_family(family: AlgorithmFamily, expected: AlgorithmFamily) -> Result<(), Error> {
    if family == expected {
        Ok(())
    } else {
        Err(ErrorKind::InvalidKeyFormat.into())
    }
}

enum Key {
    Hmac(hmac::Key),
    Rsa(&'static dyn sig::RsaEncoding, RsaKeyPair),
    Ecdsa(EcdsaKeyPair),
}

struct RingSigner {
    algorithm: Algorithm,
    key: Key,
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let rng = SystemRandom::new();
        match &self.key {
            Key::Hmac(key) => Ok(hmac::sign(key, message).as_ref().to_vec()),
            Key::Rsa(padding, pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(*padding, &rng, message, &mut signature)
                    .map_err(|_| signature::Error::new())?;
                Ok(signature)
            }
            Key::Ecdsa(pair) => pair
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new()),
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    let algorithm = *algorithm;
    let key = if let Some(hmac_algorithm) = hmac_algorithm(algorithm) {
        Key::Hmac(hmac::Key::new(hmac_algorithm, key.try_get_hmac_secret()?))
    } else if let Some(padding) = rsa_signing(algorithm) {
        require_family(key.family(), AlgorithmFamily::Rsa)?;
        let pair = RsaKeyPair::from_der(key.inner())
            .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?;
        Key::Rsa(padding, pair)
    } else if let Some(ecdsa) = ecdsa_signing(algorithm) {
        require_family(key.family(), AlgorithmFamily::Ec)?;
        let pair = EcdsaKeyPair::from_pkcs8(ecdsa, key.inner(), &SystemRandom::new())
            .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
        Key::Ecdsa(pair)
    } else {
        return Err(ErrorKind::InvalidAlgorithm.into());
    };
    Ok(Box::new(RingSigner { algorithm, key }))
}

fn extract_rsa_public_key_components(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let pair = RsaKeyPair::from_der(der).map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?;
    let components = sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
    Ok((components.n, components.e))
}

fn extract_ec_public_key_coordinates(
    pkcs8: &[u8],
    algorithm: Algorithm,
) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), Error> {
    let (curve, coordinate_len) = match algorithm {
        Algorithm::ES256 => (EllipticCurve::P256, 32),
        Algorithm::ES384 => (EllipticCurve::P384, 48),
        _ => return Err(ErrorKind::InvalidEcdsaKey.into()),
    };
    let signing = ecdsa_signing(algorithm).ok_or(ErrorKind::InvalidEcdsaKey)?;
    let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8, &SystemRandom::new())
        .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
    // An uncompressed point: 0x04 || x || y.
    match pair.public_key().as_ref().split_first() {
        Some((4, point)) if point.len() == 2 * coordinate_len => {
            let (x, y) = point.split_at(coordinate_len);
            Ok((curve, x.to_vec(), y.to_vec()))
        }
        _ => Err(ErrorKind::InvalidEcdsaKey.into()),
    }
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Vec<u8> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &digest::SHA256,
        ThumbprintHash::SHA384 => &digest::SHA384,
        ThumbprintHash::SHA512 => &digest::SHA512,
    };
    digest::digest(algorithm, data).as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::errors::ErrorKind;
    use jsonwebtoken::{Header, Validation};

    use super::super::test_support::*;
    use super::*;

    /// Signs a token with `signer` and checks that `verifier` accepts it and refuses it with
    /// one signature byte changed.
    fn round_trip(algorithm: Algorithm, signer: &EncodingKey, verifier: &DecodingKey) {
        let claims = json!({"sub": "alice", "exp": jsonwebtoken::get_current_timestamp() + 600});
        let token = jsonwebtoken::encode(&Header::new(algorithm), &claims, signer)
            .unwrap_or_else(|e| panic!("{algorithm:?} signs: {e}"));
        let validation = Validation::new(algorithm);
        let decoded = jsonwebtoken::decode::<Value>(&token, verifier, &validation)
            .unwrap_or_else(|e| panic!("{algorithm:?} verifies: {e}"));
        assert_eq!(decoded.claims["sub"], "alice");

        let (signed, signature) = token.rsplit_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
        bytes[0] ^= 1;
        let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(bytes));
        let refused = jsonwebtoken::decode::<Value>(&forged, verifier, &validation).unwrap_err();
        assert_eq!(
            refused.kind(),
            &ErrorKind::InvalidSignature,
            "{algorithm:?} refuses a changed signature"
        );
    }

    #[test]
    fn every_supported_algorithm_signs_and_verifies_on_ring_and_eddsa_has_no_implementation() {
        install();
        for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            round_trip(
                algorithm,
                &EncodingKey::from_secret(SECRET),
                &DecodingKey::from_secret(SECRET),
            );
        }
        let rsa_private = EncodingKey::from_rsa_pem(&fixture_bytes("rsa-private.pem")).unwrap();
        let rsa_public = DecodingKey::from_rsa_pem(&fixture_bytes("rsa-public.pem")).unwrap();
        for algorithm in [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ] {
            round_trip(algorithm, &rsa_private, &rsa_public);
        }
        round_trip(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(&fixture_bytes("ec-private.pem")).unwrap(),
            &DecodingKey::from_ec_pem(&fixture_bytes("ec-public.pem")).unwrap(),
        );
        let rng = SystemRandom::new();
        let p384 =
            EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P384_SHA384_FIXED_SIGNING, p384.as_ref(), &rng)
                .unwrap();
        round_trip(
            Algorithm::ES384,
            &EncodingKey::from_ec_der(p384.as_ref()),
            &DecodingKey::from_ec_der(pair.public_key().as_ref()),
        );

        // A key of another family is refused before any signature is checked.
        assert!(new_verifier(&Algorithm::RS256, &DecodingKey::from_secret(SECRET)).is_err());
        assert!(new_signer(&Algorithm::ES256, &rsa_private).is_err());
        assert!(new_verifier(&Algorithm::EdDSA, &DecodingKey::from_secret(SECRET)).is_err());
        assert!(new_signer(&Algorithm::EdDSA, &EncodingKey::from_secret(SECRET)).is_err());
    }
}
