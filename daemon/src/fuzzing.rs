//! The functions the fuzz targets in `fuzz/` call, one per target, so that
//! `daemon/tests/fuzz_seeds.rs` can run the same code over the seed corpus
//! on stable Rust. Each panics on a broken promise, never on bad input.

use crate::codec::{self, Dialect};

/// The `:authority` rewriter: the first byte chooses how the rest is cut
/// into reads (1 to 256 bytes); whatever comes in, the rewriter must not
/// panic or hold more than one header block's limit ([`crate::authority::rewrite`]
/// checks that).
pub fn authority(data: &[u8]) {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    crate::authority::rewrite(input, usize::from(first) + 1);
}

/// The relay codec: any text decodes or fails cleanly in both dialects,
/// and what decodes encodes to text that decodes to the same frame.
pub fn codec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for dialect in [Dialect::Current, Dialect::Legacy] {
        if let Ok(frame) = codec::decode(text, dialect) {
            let again = codec::encode(&frame, dialect);
            assert_eq!(
                codec::decode(&again, dialect),
                Ok(frame),
                "{dialect}: {text:?} -> {again:?}"
            );
        }
    }
}
