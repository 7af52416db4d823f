//! Merkle tree hashing as RFC 6962 (Certificate Transparency) defines it:
//! a leaf is `SHA-256(0x00 || data)`, an inner node
//! `SHA-256(0x01 || left || right)`, and a tree of `n` leaves splits at the
//! largest power of two below `n`. The prefixes keep a leaf from passing
//! for an inner node (second-preimage resistance).

use ring::digest::{Context, SHA256};

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// The hash of a leaf holding `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut context = Context::new(&SHA256);
    context.update(&[0x00]);
    context.update(data);
    finish(context)
}

/// The hash of an inner node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut context = Context::new(&SHA256);
    context.update(&[0x01]);
    context.update(left);
    context.update(right);
    finish(context)
}

fn finish(context: Context) -> Hash {
    context.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The Merkle tree hash of leaves whose hashes are `leaves` (MTH in
/// RFC 6962 section 2.1); the empty tree is `SHA-256("")`.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => ring::digest::digest(&SHA256, b"").as_ref().try_into().expect("32 bytes"),
        1 => leaves[0],
        n => {
            let split = n.next_power_of_two() / 2;
            node_hash(&root(&leaves[..split]), &root(&leaves[split..]))
        }
    }
}

/// The audit path of leaf `index` in a tree of `leaves` (PATH in RFC 6962
/// section 2.1.1), bottom first.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 || index >= n {
        return Vec::new();
    }
    let split = n.next_power_of_two() / 2;
    if index < split {
        let mut path = inclusion_proof(&leaves[..split], index);
        path.push(root(&leaves[split..]));
        path
    } else {
        let mut path = inclusion_proof(&leaves[split..], index - split);
        path.push(root(&leaves[..split]));
        path
    }
}

/// Whether `proof` shows leaf `leaf` at `index` in a tree of `size`
/// leaves with root `expected` (RFC 9162 section 2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], expected: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut hash = *leaf;
    for sibling in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            hash = node_hash(sibling, &hash);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            hash = node_hash(&hash, sibling);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && hash == *expected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(hash: &Hash) -> String {
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The leaves and roots of the Certificate Transparency reference
    /// tests (RFC 6962 hashing; certificate-transparency merkle_test).
    const INPUTS: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];
    const ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn roots_match_the_rfc_6962_reference_vectors() {
        assert_eq!(hex(&root(&[])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let leaves: Vec<Hash> = INPUTS.iter().map(|data| leaf_hash(data)).collect();
        for (n, want) in ROOTS.iter().enumerate() {
            assert_eq!(hex(&root(&leaves[..=n])), *want, "tree of {} leaves", n + 1);
        }
    }

    #[test]
    fn audit_paths_match_the_reference_vectors() {
        let leaves: Vec<Hash> = INPUTS.iter().map(|data| leaf_hash(data)).collect();
        let cases: [(usize, usize, &[&str]); 3] = [
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (2, 3, &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (index, size, want) in cases {
            let path: Vec<String> = inclusion_proof(&leaves[..size], index).iter().map(hex).collect();
            assert_eq!(path, want, "leaf {index} of {size}");
        }
    }

    #[test]
    fn every_leaf_proves_its_inclusion_and_no_other_does() {
        let leaves: Vec<Hash> = INPUTS.iter().map(|data| leaf_hash(data)).collect();
        for size in 1..=leaves.len() {
            let tree = &leaves[..size];
            let top = root(tree);
            for index in 0..size {
                let proof = inclusion_proof(tree, index);
                assert!(
                    verify_inclusion(&tree[index], index as u64, size as u64, &proof, &top),
                    "{index} of {size}"
                );
                let other = leaf_hash(b"not in the tree");
                assert!(!verify_inclusion(&other, index as u64, size as u64, &proof, &top));
                if size > 1 {
                    let moved = (index + 1) % size;
                    assert!(!verify_inclusion(&tree[index], moved as u64, size as u64, &proof, &top));
                }
            }
        }
    }
}
