//! Sealing and opening one secret: AES-256-GCM-SIV under a per-tenant data key, with
//! associated data that binds the ciphertext to its row, and the keyed fingerprint.
//!
//! Pure functions, no I/O. Every encoding below is length-prefixed (a big-endian `u32` length
//! before each field), so no two different field lists encode alike: ("ab", "c") ≠ ("a", "bc").
//!
//! - data key = HKDF-SHA256(ikm = master key, salt = [`SALT`],
//!   info = `"dsreg/v1/data-key"` ‖ key version ‖ org ‖ project)
//! - associated data = `"dsreg/v1/secret"` ‖ org ‖ project ‖ datasource id ‖ name ‖ key version
//!   ‖ revision
//! - fingerprint = the first 6 bytes, in hex, of HMAC-SHA256(key, datasource id ‖ name ‖
//!   plaintext) with key = HKDF-SHA256(master key, [`SALT`],
//!   `"dsreg/v1/fingerprint"` ‖ key version ‖ org ‖ project): comparable between writes under
//!   one key version, useless for guessing a value without the master key.

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use hkdf::Hkdf;
use hkdf::hmac::{Hmac, Mac};
use rand::TryRngCore;
use sha2::Sha256;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::{Error, MAX_SECRET_BYTES, MasterKey, SecretString};

/// The HKDF salt: a fixed domain string (the master key is already uniformly random).
pub const SALT: &[u8] = b"dsreg datasource registry secrets";

/// Nonce length in bytes (96 bits).
pub const NONCE_BYTES: usize = 12;

/// Authentication tag length in bytes.
pub const TAG_BYTES: usize = 16;

/// Fingerprint length in hex characters.
pub const FINGERPRINT_CHARS: usize = 12;

/// Where a secret lives: everything its ciphertext is bound to except the key version (which
/// comes from the [`MasterKey`] used).
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// Tenant: organisation.
    pub org: &'a str,
    /// Tenant: project.
    pub project: &'a str,
    /// The datasource.
    pub datasource: Uuid,
    /// The secret's name.
    pub name: &'a str,
    /// The revision the row carries (or will carry, when sealing).
    pub revision: i64,
}

/// A sealed value: what the row stores besides its key version.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The random nonce.
    pub nonce: [u8; NONCE_BYTES],
    /// Ciphertext followed by the tag.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// Appends `field` with its length.
fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    // Every field is far below 4 GiB (names ≤ 128 bytes, values ≤ 64 KiB).
    let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
}

fn tenant_info(label: &str, key_version: u32, org: &str, project: &str) -> Vec<u8> {
    let mut info = Vec::with_capacity(64 + org.len() + project.len());
    put_field(&mut info, label.as_bytes());
    put_field(&mut info, &key_version.to_be_bytes());
    put_field(&mut info, org.as_bytes());
    put_field(&mut info, project.as_bytes());
    info
}

fn derive(master: &MasterKey, info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut okm = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(SALT), master.bytes())
        .expand(info, &mut *okm)
        // Invariant: 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// The data key of (`org`, `project`) under `master`.
pub fn data_key(master: &MasterKey, org: &str, project: &str) -> Zeroizing<[u8; 32]> {
    derive(
        master,
        &tenant_info("dsreg/v1/data-key", master.version(), org, project),
    )
}

/// The associated data of a row sealed under `key_version`.
pub fn associated_data(binding: &Binding<'_>, key_version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(128 + binding.name.len());
    put_field(&mut aad, b"dsreg/v1/secret");
    put_field(&mut aad, binding.org.as_bytes());
    put_field(&mut aad, binding.project.as_bytes());
    put_field(&mut aad, binding.datasource.as_bytes());
    put_field(&mut aad, binding.name.as_bytes());
    put_field(&mut aad, &key_version.to_be_bytes());
    put_field(&mut aad, &binding.revision.to_be_bytes());
    aad
}

fn cipher_for(master: &MasterKey, binding: &Binding<'_>) -> Aes256GcmSiv {
    let key = data_key(master, binding.org, binding.project);
    Aes256GcmSiv::new_from_slice(&key[..])
        // Invariant: the data key is 32 bytes, AES-256's key length.
        .expect("a 32-byte data key")
}

/// Seals `plaintext` for `binding` under `master`, with a fresh random nonce.
///
/// # Errors
/// [`Error::TooLarge`] over [`MAX_SECRET_BYTES`]; [`Error::Random`] if the random source fails.
pub fn seal(master: &MasterKey, binding: &Binding<'_>, plaintext: &[u8]) -> Result<Sealed, Error> {
    if plaintext.len() > MAX_SECRET_BYTES {
        return Err(Error::TooLarge {
            bytes: plaintext.len(),
            limit: MAX_SECRET_BYTES,
        });
    }
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| Error::Random(e.to_string()))?;
    let cipher = cipher_for(master, binding);
    let aad = associated_data(binding, master.version());
    // Sized for the tag up front: the buffer never reallocates and leaves no plaintext copy.
    let mut buffer = Zeroizing::new(Vec::with_capacity(plaintext.len() + TAG_BYTES));
    buffer.extend_from_slice(plaintext);
    cipher
        .encrypt_in_place(&Nonce::from(nonce), &aad, &mut *buffer)
        // Invariant: AES-GCM-SIV fails only beyond 2^36 bytes; the value is at most 64 KiB.
        .expect("AES-GCM-SIV encrypts any value of at most 64 KiB");
    Ok(Sealed {
        nonce,
        ciphertext: std::mem::take(&mut *buffer),
    })
}

/// Opens a row sealed under `master` for `binding`.
///
/// # Errors
/// [`Error::Decrypt`] naming the datasource, secret and key version when the nonce has the
/// wrong length, the tag does not verify (tampered, copied, replayed, wrong key) or the value
/// is not UTF-8.
pub fn open(
    master: &MasterKey,
    binding: &Binding<'_>,
    nonce: &[u8],
    ciphertext: &[u8],
) -> Result<SecretString, Error> {
    let failed = || Error::Decrypt {
        datasource: binding.datasource,
        name: binding.name.to_owned(),
        key_version: i64::from(master.version()),
    };
    let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| failed())?;
    let cipher = cipher_for(master, binding);
    let aad = associated_data(binding, master.version());
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    cipher
        .decrypt_in_place(&Nonce::from(nonce), &aad, &mut *buffer)
        .map_err(|_| failed())?;
    SecretString::from_utf8(buffer).ok_or_else(failed)
}

/// The short keyed fingerprint of `plaintext` at `binding` (revision not included: equal
/// values written twice under one key version have equal fingerprints).
pub fn fingerprint(master: &MasterKey, binding: &Binding<'_>, plaintext: &[u8]) -> String {
    let key = derive(
        master,
        &tenant_info(
            "dsreg/v1/fingerprint",
            master.version(),
            binding.org,
            binding.project,
        ),
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&key[..])
        // Invariant: HMAC takes a key of any length.
        .expect("HMAC accepts a 32-byte key");
    let mut head = Vec::with_capacity(64 + binding.name.len());
    put_field(&mut head, binding.datasource.as_bytes());
    put_field(&mut head, binding.name.as_bytes());
    mac.update(&head);
    // The plaintext is last and length-prefixed, so it is fed without a copy.
    mac.update(
        &u32::try_from(plaintext.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    mac.update(plaintext);
    let tag = mac.finalize().into_bytes();
    tag[..FINGERPRINT_CHARS / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "canary-3b9e-s3cr3t-value";

    fn key(version: u32, byte: u8) -> MasterKey {
        MasterKey::new(version, [byte; 32]).unwrap()
    }

    fn binding() -> Binding<'static> {
        Binding {
            org: "acme",
            project: "core",
            datasource: Uuid::from_u128(0x1111),
            name: "password",
            revision: 3,
        }
    }

    fn assert_decrypt_fails(master: &MasterKey, b: &Binding<'_>, nonce: &[u8], ciphertext: &[u8]) {
        let err = open(master, b, nonce, ciphertext).unwrap_err();
        match &err {
            Error::Decrypt {
                datasource,
                name,
                key_version,
            } => {
                assert_eq!(*datasource, b.datasource);
                assert_eq!(name, b.name);
                assert_eq!(*key_version, i64::from(master.version()));
            }
            other => panic!("expected Decrypt, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(b.name) && !message.contains(CANARY),
            "{message}"
        );
    }

    #[test]
    fn a_sealed_value_opens_and_nonces_are_fresh() {
        let k = key(1, 7);
        let a = seal(&k, &binding(), CANARY.as_bytes()).unwrap();
        let b = seal(&k, &binding(), CANARY.as_bytes()).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(a.ciphertext.len(), CANARY.len() + TAG_BYTES);
        assert!(
            !a.ciphertext
                .windows(CANARY.len())
                .any(|w| w == CANARY.as_bytes())
        );
        let opened = open(&k, &binding(), &a.nonce, &a.ciphertext).unwrap();
        assert_eq!(opened.expose(), CANARY);
        assert!(!format!("{a:?}").contains(CANARY));
    }

    #[test]
    fn an_empty_value_round_trips() {
        let k = key(1, 7);
        let s = seal(&k, &binding(), b"").unwrap();
        assert_eq!(
            open(&k, &binding(), &s.nonce, &s.ciphertext)
                .unwrap()
                .expose(),
            ""
        );
    }

    #[test]
    fn one_tampered_byte_of_ciphertext_or_nonce_fails() {
        let k = key(1, 7);
        let s = seal(&k, &binding(), CANARY.as_bytes()).unwrap();
        for i in 0..s.ciphertext.len() {
            let mut ct = s.ciphertext.clone();
            ct[i] ^= 0x01;
            assert_decrypt_fails(&k, &binding(), &s.nonce, &ct);
        }
        for i in 0..NONCE_BYTES {
            let mut nonce = s.nonce;
            nonce[i] ^= 0x80;
            assert_decrypt_fails(&k, &binding(), &nonce, &s.ciphertext);
        }
        assert_decrypt_fails(&k, &binding(), &s.nonce[..11], &s.ciphertext);
        assert_decrypt_fails(&k, &binding(), &s.nonce, &s.ciphertext[..TAG_BYTES - 1]);
    }

    #[test]
    fn the_associated_data_binds_datasource_tenant_name_version_and_revision() {
        let k = key(1, 7);
        let s = seal(&k, &binding(), CANARY.as_bytes()).unwrap();
        let elsewhere = [
            Binding {
                datasource: Uuid::from_u128(0x2222),
                ..binding()
            },
            Binding {
                org: "other",
                ..binding()
            },
            Binding {
                project: "edge",
                ..binding()
            },
            Binding {
                name: "api_key",
                ..binding()
            },
            Binding {
                revision: 4,
                ..binding()
            },
            Binding {
                revision: 2,
                ..binding()
            },
        ];
        for b in &elsewhere {
            assert_decrypt_fails(&k, b, &s.nonce, &s.ciphertext);
        }
        // The same key bytes under another version number: the version is bound too.
        assert_decrypt_fails(&key(2, 7), &binding(), &s.nonce, &s.ciphertext);
        // Another master key of the same version.
        assert_decrypt_fails(&key(1, 8), &binding(), &s.nonce, &s.ciphertext);
    }

    #[test]
    fn tenants_and_versions_get_different_data_keys() {
        let k = key(1, 7);
        let base = data_key(&k, "acme", "core");
        assert_ne!(*base, *data_key(&k, "acme", "edge"));
        assert_ne!(*base, *data_key(&k, "other", "core"));
        assert_ne!(*base, *data_key(&key(2, 7), "acme", "core"));
        assert_ne!(*base, *k.bytes());
        // Length prefixes keep shifted boundaries apart.
        assert_ne!(*data_key(&k, "ab", "c"), *data_key(&k, "a", "bc"));
        assert_eq!(*base, *data_key(&key(1, 7), "acme", "core"));
    }

    #[test]
    fn field_boundaries_cannot_shift_in_the_associated_data() {
        let a = Binding {
            org: "ab",
            project: "c",
            ..binding()
        };
        let b = Binding {
            org: "a",
            project: "bc",
            ..binding()
        };
        assert_ne!(associated_data(&a, 1), associated_data(&b, 1));
    }

    #[test]
    fn fingerprints_are_short_keyed_and_bound_to_the_row() {
        let k = key(1, 7);
        let fp = fingerprint(&k, &binding(), b"hunter2");
        assert_eq!(fp.len(), FINGERPRINT_CHARS);
        assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
        // Stable across revisions, so equal values compare equal.
        let later = Binding {
            revision: 9,
            ..binding()
        };
        assert_eq!(fp, fingerprint(&k, &later, b"hunter2"));
        assert_ne!(fp, fingerprint(&k, &binding(), b"hunter3"));
        assert_ne!(fp, fingerprint(&key(1, 8), &binding(), b"hunter2"));
        let other_name = Binding {
            name: "api_key",
            ..binding()
        };
        assert_ne!(fp, fingerprint(&k, &other_name, b"hunter2"));
        let other_ds = Binding {
            datasource: Uuid::from_u128(0x2222),
            ..binding()
        };
        assert_ne!(fp, fingerprint(&k, &other_ds, b"hunter2"));
        // Not a plain hash of the value.
        use sha2::Digest;
        let plain: String = Sha256::digest(b"hunter2")[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_ne!(fp, plain);
    }

    #[test]
    fn an_oversized_value_is_refused() {
        let k = key(1, 7);
        let big = vec![b'x'; MAX_SECRET_BYTES + 1];
        assert!(matches!(
            seal(&k, &binding(), &big),
            Err(Error::TooLarge { .. })
        ));
    }
}
