//! MD5, the digest S3 checks bodies against (`Content-MD5`) and builds ETags from,
//! computed by AWS-LC, which the TLS stack already links.
//!
//! Why not the pure-Rust `md-5` crate: hashing each part before it is sent was two thirds
//! of the daemon's CPU in a 1 GiB upload (perf, issue 8), and on two cores that CPU is
//! taken from the server. AWS-LC's assembly hashes 660 MB/s on this machine where `md-5`
//! does 490 MB/s (its `asm` feature 510 MB/s). The tests check it against `md-5`.

use std::mem::MaybeUninit;

/// An MD5 being computed: [`Md5::update`] with the bytes in order, then
/// [`Md5::finalize`].
pub struct Md5(aws_lc_sys::MD5_CTX);

// Hashing runs on blocking threads and across awaits: the context (plain integers, no
// pointers) must stay `Send`; this fails to compile if a binding update changes that.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Md5>();
};

impl Md5 {
    pub fn new() -> Self {
        let mut ctx = MaybeUninit::<aws_lc_sys::MD5_CTX>::uninit();
        // SAFETY: MD5_Init sets every field of the context it is given (the initial
        // state, zero length, an empty block) and cannot fail; the context holds no
        // pointers, so it may be moved afterwards.
        unsafe {
            aws_lc_sys::MD5_Init(ctx.as_mut_ptr());
            Self(ctx.assume_init())
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        // SAFETY: the context was initialised by `new`; `data` is valid for reads of
        // `data.len()` bytes for the duration of the call, which keeps no reference.
        unsafe {
            aws_lc_sys::MD5_Update(&mut self.0, data.as_ptr().cast(), data.len());
        }
    }

    pub fn finalize(mut self) -> [u8; 16] {
        let mut out = [0u8; 16];
        // SAFETY: the context was initialised by `new`; `out` has room for the 16 bytes
        // (MD5_DIGEST_LENGTH) that MD5_Final writes.
        unsafe {
            aws_lc_sys::MD5_Final(out.as_mut_ptr(), &mut self.0);
        }
        out
    }

    /// The MD5 of `data` in one call.
    pub fn digest(data: &[u8]) -> [u8; 16] {
        let mut md5 = Self::new();
        md5.update(data);
        md5.finalize()
    }
}

impl Default for Md5 {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Md5;
    use md5_reference::Digest;

    #[test]
    fn known_digests() {
        // RFC 1321, appendix A.5.
        assert_eq!(
            crate::plan::hex(&Md5::digest(b"")),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(
            crate::plan::hex(&Md5::digest(b"message digest")),
            "f96b697d7cb7938d525a2f31aaf161d0"
        );
    }

    #[test]
    fn agrees_with_md5_crate_whatever_the_pieces() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        // Lengths around the 64-byte block, and pieces that split blocks anywhere.
        for len in [0, 1, 55, 56, 63, 64, 65, 127, 128, 1000, 65_537, 200_000] {
            let whole = &data[..len];
            let expected: [u8; 16] = md5_reference::Md5::digest(whole).into();
            assert_eq!(Md5::digest(whole), expected, "length {len}");
            for piece in [1, 3, 64, 100, 4096] {
                let mut md5 = Md5::new();
                for chunk in whole.chunks(piece) {
                    md5.update(chunk);
                }
                assert_eq!(
                    md5.finalize(),
                    expected,
                    "length {len} in pieces of {piece}"
                );
            }
        }
    }
}
