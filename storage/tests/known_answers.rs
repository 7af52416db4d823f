//! The primitives the archive and the batches rely on, through the same
//! ring calls logvault makes, against published vectors: AES-256-GCM from
//! the GCM specification (McGrew and Viega, test cases 13 and 16) and
//! Ed25519 from RFC 8032 section 7.1. Merkle hashing has its own vectors
//! in `logvault_storage::merkle`.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

fn hex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

fn seal(key: &[u8], nonce: &[u8], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let mut buffer = plain.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::try_assume_unique_for_key(nonce).unwrap(),
            Aad::from(aad),
            &mut buffer,
        )
        .unwrap();
    buffer.extend_from_slice(tag.as_ref());
    buffer
}

fn open(key: &[u8], nonce: &[u8], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let mut buffer = sealed.to_vec();
    let plain =
        key.open_in_place(Nonce::try_assume_unique_for_key(nonce).ok()?, Aad::from(aad), &mut buffer).ok()?;
    Some(plain.to_vec())
}

#[test]
fn aes_256_gcm_matches_the_gcm_specification() {
    // Test case 13: zero key and nonce, nothing to encrypt: the tag alone.
    assert_eq!(seal(&[0; 32], &[0; 12], b"", b""), hex("530f8afbc74536b9a963b4f1c4cb738b"));
    // Test case 16: 60 bytes (a partial last block) under 20 bytes of
    // associated data (not whole blocks either).
    let key = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
    let nonce = hex("cafebabefacedbaddecaf888");
    let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
    let plain = hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
         1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39");
    let sealed = hex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
         8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
         76fc6ece0f4e1768cddf8853bb2d551b");
    assert_eq!(seal(&key, &nonce, &aad, &plain), sealed);
    assert_eq!(open(&key, &nonce, &aad, &sealed), Some(plain));
    // Any other associated data, or a flipped bit, and it does not open.
    assert_eq!(open(&key, &nonce, b"other", &sealed), None);
    let mut flipped = sealed.clone();
    flipped[7] ^= 1;
    assert_eq!(open(&key, &nonce, &aad, &flipped), None);
}

#[test]
fn ed25519_matches_rfc_8032() {
    let vectors = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
    ];
    for (seed, public, message, signature) in vectors {
        let (seed, public, message, signature) = (hex(seed), hex(public), hex(message), hex(signature));
        let key = Ed25519KeyPair::from_seed_and_public_key(&seed, &public).unwrap();
        assert_eq!(key.public_key().as_ref(), public.as_slice());
        assert_eq!(key.sign(&message).as_ref(), signature.as_slice());
        let verifier = UnparsedPublicKey::new(&ED25519, &public);
        verifier.verify(&message, &signature).unwrap();
        let mut forged = signature.clone();
        forged[0] ^= 1;
        assert!(verifier.verify(&message, &forged).is_err());
    }
}

/// A batch signed with RFC 8032's first key verifies under its public key,
/// through the batch code, and under no other.
#[test]
fn batches_verify_under_the_rfc_8032_key() {
    use logvault_storage::batch::Batch;
    use logvault_storage::{BatchBuilder, Level, Limits, WireRecord};
    let seed = hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
    let public = hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
    let key = Ed25519KeyPair::from_seed_and_public_key(&seed, &public).unwrap();
    let mut builder = BatchBuilder::new("web-1", "/var/log/syslog", 1, 0, [0; 32]);
    builder.push(WireRecord::new(1, Level::Info, "a line"));
    let bytes = builder.sign(&key);
    let batch = Batch::decode(&bytes, &Limits::default()).unwrap();
    batch.verify_encoded(&bytes, &public).unwrap();
    let other = hex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c");
    assert!(batch.verify_encoded(&bytes, &other).is_err());
}
