//! Master keys: versioned 32-byte keys behind the [`KeyProvider`] trait, loaded from the
//! environment ([`EnvKeyProvider`]) or a key file ([`FileKeyProvider`]).
//!
//! A provider is loaded once at start-up and read-only afterwards; rotation writes a new key
//! file (or a new `DSREG_MASTER_KEYS`) and the registry picks it up on its next start.
//! Every master key lives in a [`MasterKey`], which zeroizes on drop and never prints itself.
//!
//! # An external KMS or Vault
//!
//! Two adapters exist in [`kms`](super::kms): a key command and Vault's transit engine.
//! For another, implement [`KeyProvider`] in an adapter and hand it to
//! [`Secrets::new`](super::Secrets::new) as `Arc<dyn KeyProvider>`; nothing else changes.
//! The trait is synchronous and called per secret, so the adapter fetches (or unwraps, for a
//! KMS that keeps keys wrapped) every version it serves at construction, async, with its own
//! timeouts and retries, and answers from memory afterwards; a refresh task, if wanted, swaps
//! the set behind a lock. `active_version` is the version new writes use; `versions` lists every
//! version it can open; `key` returns [`Error::UnknownKeyVersion`] for any other. Keep the
//! version numbers stable across providers: rows record them.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::TryRngCore;
use zeroize::Zeroizing;

use super::Error;
use super::private_file::{Existing, write_private};
use super::zeroized;

/// The environment variable the config layer reads for [`EnvKeyProvider::parse`].
pub const MASTER_KEYS_ENV: &str = "DSREG_MASTER_KEYS";

/// A master key's length in bytes (AES-256).
pub const KEY_BYTES: usize = 32;

/// One version of the master key: 32 bytes, zeroized on drop, never in `Debug`.
#[derive(Clone)]
pub struct MasterKey {
    version: u32,
    bytes: Zeroizing<[u8; KEY_BYTES]>,
}

impl MasterKey {
    /// A key of `version` (positive, at most `i32::MAX`: rows store it as `integer`).
    ///
    /// # Errors
    /// [`Error::InvalidKeys`] for version 0 or above `i32::MAX`.
    pub fn new(version: u32, bytes: [u8; KEY_BYTES]) -> Result<Self, Error> {
        let bytes = Zeroizing::new(bytes);
        check_version(version).map_err(Error::InvalidKeys)?;
        Ok(Self { version, bytes })
    }

    /// A fresh random key of `version`, from the operating system's random source.
    ///
    /// # Errors
    /// [`Error::Random`] if the random source fails; [`Error::InvalidKeys`] for a bad version.
    pub fn generate(version: u32) -> Result<Self, Error> {
        let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
        rand::rngs::OsRng
            .try_fill_bytes(&mut *bytes)
            .map_err(|e| Error::Random(e.to_string()))?;
        check_version(version).map_err(Error::InvalidKeys)?;
        Ok(Self { version, bytes })
    }

    /// Its version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The key material, for the cipher only.
    pub(crate) fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.bytes
    }

    fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(&self.bytes[..]))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn check_version(version: u32) -> Result<(), String> {
    if version == 0 || version > i32::MAX as u32 {
        Err(format!(
            "key version {version} is out of range (1..={})",
            i32::MAX
        ))
    } else {
        Ok(())
    }
}

/// Where master keys come from. Implementations load their keys once and answer from memory
/// (the methods are called per secret); see the module doc for a KMS or Vault adapter.
pub trait KeyProvider: Send + Sync {
    /// The version new writes are sealed under.
    fn active_version(&self) -> u32;

    /// The key of `version`.
    ///
    /// # Errors
    /// [`Error::UnknownKeyVersion`] when this provider does not have it.
    fn key(&self, version: u32) -> Result<MasterKey, Error>;

    /// Every version it can open, ascending.
    fn versions(&self) -> Vec<u32>;
}

/// A set of master keys with one active: what the built-in providers hold.
#[derive(Clone)]
pub(super) struct KeyRing {
    keys: BTreeMap<u32, MasterKey>,
    active: u32,
}

impl KeyProvider for KeyRing {
    fn active_version(&self) -> u32 {
        self.active
    }

    fn key(&self, version: u32) -> Result<MasterKey, Error> {
        KeyRing::key(self, version)
    }

    fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }
}

impl KeyRing {
    /// Checks `active` (the highest when `None`) against `keys`.
    pub(super) fn new(keys: BTreeMap<u32, MasterKey>, active: Option<u32>) -> Result<Self, String> {
        let Some(&highest) = keys.keys().next_back() else {
            return Err("no keys".into());
        };
        let active = active.unwrap_or(highest);
        if !keys.contains_key(&active) {
            return Err(format!("the active version {active} has no key"));
        }
        Ok(Self { keys, active })
    }

    fn key(&self, version: u32) -> Result<MasterKey, Error> {
        self.keys
            .get(&version)
            .cloned()
            .ok_or(Error::UnknownKeyVersion(version))
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

/// Decodes one base64 key without leaving a decoded copy anywhere but the returned key.
pub(super) fn decode_key(version: u32, encoded: &str) -> Result<MasterKey, String> {
    // Room for any plausible mistake's length, so the error can say how long it was.
    let mut buf = Zeroizing::new([0u8; 256]);
    let len = STANDARD
        .decode_slice(encoded.trim(), &mut *buf)
        .map_err(|e| match e {
            base64::DecodeSliceError::OutputSliceTooSmall => {
                format!("key version {version} is far longer than {KEY_BYTES} bytes")
            }
            // The decode error names a byte offset and at most one character; still, say less.
            base64::DecodeSliceError::DecodeError(_) => {
                format!("key version {version} is not valid base64")
            }
        })?;
    if len != KEY_BYTES {
        return Err(format!(
            "key version {version} decodes to {len} bytes; a key is {KEY_BYTES} bytes \
             (generate one with `openssl rand -base64 32`)"
        ));
    }
    let mut bytes = [0u8; KEY_BYTES];
    bytes.copy_from_slice(&buf[..KEY_BYTES]);
    let key = MasterKey::new(version, bytes);
    // The copy on this frame: `MasterKey::new` took its own.
    zeroize::Zeroize::zeroize(&mut bytes);
    key.map_err(|e| match e {
        Error::InvalidKeys(reason) => reason,
        other => other.to_string(),
    })
}

/// Master keys given as `1:<base64 32 bytes>,2:<base64 32 bytes>` (the value of
/// `DSREG_MASTER_KEYS`, read by the config layer). The active version is the highest unless
/// given explicitly.
#[derive(Debug, Clone)]
pub struct EnvKeyProvider {
    ring: KeyRing,
}

impl EnvKeyProvider {
    /// Parses `value`; `active` overrides the default (the highest version).
    ///
    /// # Errors
    /// [`Error::InvalidKeys`] naming the entry (by position and version, never its key): empty
    /// list, missing `:`, bad version, bad base64, wrong length, duplicate version, or an
    /// active version without a key.
    pub fn parse(value: &str, active: Option<u32>) -> Result<Self, Error> {
        let mut keys = BTreeMap::new();
        for (i, entry) in value.split(',').enumerate() {
            let position = i + 1;
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(Error::InvalidKeys(format!("entry {position} is empty")));
            }
            let Some((version, encoded)) = entry.split_once(':') else {
                return Err(Error::InvalidKeys(format!(
                    "entry {position} is not VERSION:BASE64KEY"
                )));
            };
            let version: u32 = version.trim().parse().map_err(|_| {
                Error::InvalidKeys(format!(
                    "entry {position}: the version must be a positive integer"
                ))
            })?;
            let key = decode_key(version, encoded)
                .map_err(|reason| Error::InvalidKeys(format!("entry {position}: {reason}")))?;
            if keys.insert(version, key).is_some() {
                return Err(Error::InvalidKeys(format!(
                    "entry {position}: key version {version} appears twice"
                )));
            }
        }
        let ring = KeyRing::new(keys, active).map_err(Error::InvalidKeys)?;
        Ok(Self { ring })
    }
}

impl KeyProvider for EnvKeyProvider {
    fn active_version(&self) -> u32 {
        self.ring.active
    }

    fn key(&self, version: u32) -> Result<MasterKey, Error> {
        self.ring.key(version)
    }

    fn versions(&self) -> Vec<u32> {
        self.ring.keys.keys().copied().collect()
    }
}

/// The key file's shape: `{"active": 2, "keys": {"1": "<base64>", "2": "<base64>"}}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileIn<'a> {
    active: u32,
    #[serde(borrow)]
    keys: BTreeMap<String, &'a str>,
}

/// Master keys from a JSON key file,
/// `{"active": 2, "keys": {"1": "<base64 32 bytes>", "2": "<base64 32 bytes>"}}`, which must
/// not be readable by group or others (mode 0600 or 0400).
#[derive(Debug, Clone)]
pub struct FileKeyProvider {
    path: PathBuf,
    ring: KeyRing,
}

impl FileKeyProvider {
    /// Loads the key file at `path`.
    ///
    /// # Errors
    /// [`Error::InvalidKeyFile`] naming the path: missing, unreadable, readable by group or
    /// others (with its mode), not the expected JSON, a bad key, or an active version without
    /// a key.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let ring = read_ring(path)?;
        Ok(Self {
            path: path.to_owned(),
            ring,
        })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a development key file at `path` (mode 0600, one random key, version 1; its
    /// folder mode 0700 if missing) unless one exists. Returns whether it created one, so the
    /// caller can say "created a development key file at …".
    ///
    /// # Errors
    /// [`Error::InvalidKeyFile`] when the file or its folder cannot be written;
    /// [`Error::Random`].
    pub fn create_dev(path: impl AsRef<Path>) -> Result<bool, Error> {
        let path = path.as_ref();
        if path.exists() {
            return Ok(false);
        }
        let key = MasterKey::generate(1)?;
        let ring = KeyRing::new(BTreeMap::from([(1, key)]), Some(1))
            .map_err(|reason| invalid(path, reason))?;
        // A concurrent start keeps the first file.
        write_ring(path, &ring, Existing::Keep)
    }

    /// Adds a new random version (one above the highest) to the key file at `path` and makes
    /// it active (`dsreg keys rotate`); returns the new version. The file is replaced
    /// atomically. Run one rotation at a time; running registries pick the key up on restart.
    ///
    /// # Errors
    /// As [`FileKeyProvider::load`], and [`Error::InvalidKeyFile`] when it cannot be written.
    pub fn add_version(path: impl AsRef<Path>) -> Result<u32, Error> {
        let path = path.as_ref();
        let mut ring = read_ring(path)?;
        let highest = ring.keys.keys().next_back().copied().unwrap_or(0);
        let version = highest
            .checked_add(1)
            .filter(|v| check_version(*v).is_ok())
            .ok_or_else(|| invalid(path, "no key version left".into()))?;
        ring.keys.insert(version, MasterKey::generate(version)?);
        ring.active = version;
        write_ring(path, &ring, Existing::Replace)?;
        Ok(version)
    }
}

impl KeyProvider for FileKeyProvider {
    fn active_version(&self) -> u32 {
        self.ring.active
    }

    fn key(&self, version: u32) -> Result<MasterKey, Error> {
        self.ring.key(version)
    }

    fn versions(&self) -> Vec<u32> {
        self.ring.keys.keys().copied().collect()
    }
}

fn invalid(path: &Path, reason: String) -> Error {
    Error::InvalidKeyFile {
        path: path.to_owned(),
        reason,
    }
}

fn read_ring(path: &Path) -> Result<KeyRing, Error> {
    let mut file = std::fs::File::open(path).map_err(|e| invalid(path, format!("{e}")))?;
    // The mode of the file opened, not of whatever the name points to a moment later.
    let meta = file.metadata().map_err(|e| invalid(path, format!("{e}")))?;
    if !meta.is_file() {
        return Err(invalid(path, "not a regular file".into()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            path,
            format!(
                "mode {mode:04o} lets group or others read it; it must be 0600 \
                 (chmod 600 {})",
                path.display()
            ),
        ));
    }
    let mut text = Zeroizing::new(String::new());
    std::io::Read::read_to_string(&mut file, &mut text)
        .map_err(|e| invalid(path, format!("{e}")))?;
    let set = parse_key_set(&text).map_err(|reason| invalid(path, reason))?;
    let mut keys = BTreeMap::new();
    for (version, encoded) in &set.entries {
        keys.insert(
            *version,
            decode_key(*version, encoded).map_err(|reason| invalid(path, reason))?,
        );
    }
    KeyRing::new(keys, Some(set.active)).map_err(|reason| invalid(path, reason))
}

/// A key set as text: the active version and each version's entry as given (a base64 key,
/// or a wrapped one for a KMS to open).
pub(super) struct KeySet {
    /// The active version.
    pub active: u32,
    /// (version, entry), ascending.
    pub entries: Vec<(u32, Zeroizing<String>)>,
}

/// Parses the key set shape `{"active": 2, "keys": {"1": "…", "2": "…"}}` (key files, the
/// output of a key command, Vault-wrapped key files). Errors name positions and versions,
/// never an entry's text.
pub(super) fn parse_key_set(text: &str) -> Result<KeySet, String> {
    // serde_json's messages quote at most a token; still, report only the position.
    let parsed: KeyFileIn<'_> = serde_json::from_str(text).map_err(|e| {
        format!(
            "not a key set ({{\"active\": N, \"keys\": {{\"N\": \"<base64>\"}}}}): \
             {:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    let mut entries = Vec::with_capacity(parsed.keys.len());
    for (version, entry) in &parsed.keys {
        let version: u32 = version
            .parse()
            .map_err(|_| format!("key version {version:?} is not a number"))?;
        entries.push((version, Zeroizing::new((*entry).to_owned())));
    }
    entries.sort_by_key(|(v, _)| *v);
    Ok(KeySet {
        active: parsed.active,
        entries,
    })
}

/// The key file's JSON of `ring`, built in one allocation (see [`zeroized::concat`]).
fn ring_json(ring: &KeyRing) -> Zeroizing<String> {
    let active = ring.active.to_string();
    let entries: Vec<(String, Zeroizing<String>)> = ring
        .keys
        .iter()
        .map(|(version, key)| (version.to_string(), key.to_base64()))
        .collect();
    let mut parts = vec!["{\n  \"active\": ", active.as_str(), ",\n  \"keys\": {"];
    for (i, (version, key)) in entries.iter().enumerate() {
        parts.extend([
            if i == 0 { "\n    \"" } else { ",\n    \"" },
            version.as_str(),
            "\": \"",
            key.as_str(),
            "\"",
        ]);
    }
    parts.push("\n  }\n}\n");
    zeroized::concat(&parts)
}

/// Writes `ring` as a key file at `path` (mode 0600; its folder mode 0700 if missing);
/// returns whether it was written (see [`Existing`]).
fn write_ring(path: &Path, ring: &KeyRing, existing: Existing) -> Result<bool, Error> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| invalid(path, format!("cannot create its folder: {e}")))?;
    }
    let json = ring_json(ring);
    write_private(path, json.as_bytes(), existing)
        .map_err(|e| invalid(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn b64(byte: u8, len: usize) -> String {
        STANDARD.encode(vec![byte; len])
    }

    #[test]
    fn env_keys_parse_and_the_highest_is_active() {
        let keys =
            EnvKeyProvider::parse(&format!("1:{}, 3:{}", b64(1, 32), b64(3, 32)), None).unwrap();
        assert_eq!(keys.versions(), vec![1, 3]);
        assert_eq!(keys.active_version(), 3);
        assert_eq!(keys.key(1).unwrap().bytes(), &[1u8; 32]);
        let explicit =
            EnvKeyProvider::parse(&format!("1:{},3:{}", b64(1, 32), b64(3, 32)), Some(1)).unwrap();
        assert_eq!(explicit.active_version(), 1);
    }

    #[test]
    fn env_key_errors_say_what_is_wrong_and_never_echo_the_key() {
        let secret_looking = b64(7, 31);
        let cases = [
            ("".to_owned(), None, "entry 1 is empty"),
            ("1".to_owned(), None, "not VERSION:BASE64KEY"),
            (format!("x:{}", b64(1, 32)), None, "positive integer"),
            (format!("0:{}", b64(1, 32)), None, "out of range"),
            (
                "2:not*base64*at*all".to_owned(),
                None,
                "key version 2 is not valid base64",
            ),
            (
                format!("2:{secret_looking}"),
                None,
                "key version 2 decodes to 31 bytes",
            ),
            (
                format!("1:{},1:{}", b64(1, 32), b64(2, 32)),
                None,
                "key version 1 appears twice",
            ),
            (
                format!("1:{}", b64(1, 32)),
                Some(2),
                "active version 2 has no key",
            ),
        ];
        for (value, active, expected) in cases {
            let err = EnvKeyProvider::parse(&value, active).unwrap_err();
            let message = err.to_string();
            assert!(matches!(err, Error::InvalidKeys(_)), "{message}");
            assert!(message.contains(expected), "{value:?}: {message}");
            assert!(message.contains("DSREG_MASTER_KEYS"), "{message}");
            assert!(!message.contains(&secret_looking), "{message}");
        }
    }

    #[test]
    fn an_unknown_version_is_an_error_naming_it() {
        let keys = EnvKeyProvider::parse(&format!("1:{}", b64(1, 32)), None).unwrap();
        let err = keys.key(9).unwrap_err();
        assert!(matches!(err, Error::UnknownKeyVersion(9)));
        assert!(err.to_string().contains("version 9"));
    }

    #[test]
    fn debug_never_shows_key_material() {
        let keys = EnvKeyProvider::parse(&format!("1:{}", b64(0xAB, 32)), None).unwrap();
        let key = keys.key(1).unwrap();
        for out in [format!("{keys:?}"), format!("{key:?}"), format!("{key:#?}")] {
            assert!(!out.contains(&b64(0xAB, 32)), "{out}");
            assert!(!out.to_lowercase().contains("ab, ab"), "{out}");
            assert!(!out.contains("171"), "{out}");
        }
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_naming_path_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        assert!(FileKeyProvider::create_dev(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = FileKeyProvider::load(&path).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::InvalidKeyFile { .. }));
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("0644"), "{message}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        FileKeyProvider::load(&path).unwrap();
    }

    #[test]
    fn the_dev_key_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("keys.json");
        assert!(FileKeyProvider::create_dev(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = FileKeyProvider::load(&path).unwrap();
        assert_eq!(first.versions(), vec![1]);
        assert_eq!(first.active_version(), 1);

        assert!(!FileKeyProvider::create_dev(&path).unwrap());
        let again = FileKeyProvider::load(&path).unwrap();
        assert_eq!(again.key(1).unwrap().bytes(), first.key(1).unwrap().bytes());
        // No temporary file is left behind.
        let entries = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(entries, 1);
    }

    #[test]
    fn add_version_appends_a_new_active_key_and_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        FileKeyProvider::create_dev(&path).unwrap();
        let before = FileKeyProvider::load(&path).unwrap();
        assert_eq!(FileKeyProvider::add_version(&path).unwrap(), 2);
        let after = FileKeyProvider::load(&path).unwrap();
        assert_eq!(after.versions(), vec![1, 2]);
        assert_eq!(after.active_version(), 2);
        assert_eq!(
            after.key(1).unwrap().bytes(),
            before.key(1).unwrap().bytes()
        );
        assert_ne!(after.key(2).unwrap().bytes(), after.key(1).unwrap().bytes());
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_malformed_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let write = |text: &str| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        write("{\"active\": 2, \"keys\": {\"1\": \"");
        assert!(
            FileKeyProvider::load(&path)
                .unwrap_err()
                .to_string()
                .contains("not a key set")
        );
        write(&format!(
            "{{\"active\": 2, \"keys\": {{\"1\": \"{}\"}}}}",
            b64(1, 32)
        ));
        let message = FileKeyProvider::load(&path).unwrap_err().to_string();
        assert!(message.contains("active version 2 has no key"), "{message}");
        write(&format!(
            "{{\"active\": 1, \"keys\": {{\"1\": \"{}\"}}}}",
            b64(1, 16)
        ));
        let message = FileKeyProvider::load(&path).unwrap_err().to_string();
        assert!(message.contains("decodes to 16 bytes"), "{message}");
        let missing = FileKeyProvider::load(dir.path().join("absent.json")).unwrap_err();
        assert!(missing.to_string().contains("absent.json"));
    }

    #[test]
    fn the_key_file_json_never_outgrows_its_first_allocation() {
        let keys = (1..=5)
            .map(|v| (v, MasterKey::generate(v).unwrap()))
            .collect::<BTreeMap<_, _>>();
        let ring = KeyRing::new(keys, Some(4)).unwrap();
        let json = ring_json(&ring);
        assert_eq!(
            json.capacity(),
            json.len(),
            "the key file text was reallocated"
        );
        let set = parse_key_set(&json).unwrap();
        assert_eq!(set.active, 4);
        assert_eq!(set.entries.len(), 5);
        for (version, entry) in &set.entries {
            assert_eq!(
                decode_key(*version, entry).unwrap().bytes(),
                ring.key(*version).unwrap().bytes()
            );
        }
    }
}
